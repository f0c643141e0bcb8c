"""Print pyproject.toml's dependencies, plus those of the extras named on the command line, one per line.

    python docker/requirements.py pyproject.toml worker > requirements.txt

The Dockerfile installs these (pinned by docker/constraints.txt) in a layer of their own, before the project's
source is copied, so editing the source does not reinstall TensorFlow.
"""

import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + [d for extra in sys.argv[2:] for d in project["optional-dependencies"][extra]]))
