"""Download baked-in weights at image build time (standard library only, runs before the project is installed).

    python fetch_weights.py URL SHA256-or-empty DEST

Writes DEST atomically; with a SHA256, a file that does not match fails the build.
"""

import hashlib
import os
import sys
import urllib.request

url, sha256, dest = sys.argv[1], sys.argv[2].strip().lower(), sys.argv[3]
part = dest + ".part"
digest = hashlib.sha256()
with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
    while chunk := response.read(1 << 20):
        digest.update(chunk)
        out.write(chunk)
if sha256 and digest.hexdigest() != sha256:
    os.unlink(part)
    sys.exit(f"{url}: sha256 {digest.hexdigest()}, expected {sha256}")
os.replace(part, dest)
print(f"{dest}: {os.path.getsize(dest)} bytes, sha256 {digest.hexdigest()}")
