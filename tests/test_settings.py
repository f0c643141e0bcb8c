"""The settings' own rules: queue names that cannot alias rq's keys, finite bounds on every number, the
preprocessing-process limit, unknown ``ARCFACE_*`` variables (refused by the programs, a warning in the library).
The programs' exit codes for the same mistakes: tests/test_cli_errors.py."""

from __future__ import annotations

import types
import typing
import warnings

import pytest
from pydantic import ValidationError

from producer.contract.errors import ConfigError
from producer.settings import (
    NOT_SETTINGS,
    WORKER_VARIABLES,
    CommonSettings,
    ProducerSettings,
    UnknownSettingWarning,
    accepted_range,
    load_settings,
    unknown_variables,
)
from worker.settings import WorkerSettings, available_memory, max_preprocess_processes, process_budget


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    """No ARCFACE_* variable from the caller's environment, and a working directory without a .env."""
    import os

    for name in [k for k in os.environ if k.upper().startswith("ARCFACE_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_worker_variables_name_exactly_the_worker_settings():
    own = {f"ARCFACE_{n.upper()}" for n in WorkerSettings.model_fields if n not in CommonSettings.model_fields}
    assert set(WORKER_VARIABLES) == own, "update producer.settings.WORKER_VARIABLES with the worker's settings"


def _is_number(annotation: object) -> bool:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return annotation in (int, float) or (set(args) - {type(None)} <= {int, float} and bool(args))


@pytest.mark.parametrize("cls", [ProducerSettings, WorkerSettings])
def test_every_numeric_setting_has_a_lower_and_an_upper_bound(cls):
    unbounded = []
    for name, field in cls.model_fields.items():
        if not _is_number(field.annotation):
            continue
        bounds = accepted_range(field) or ""
        if not (">" in bounds and "<" in bounds):
            unbounded.append(f"ARCFACE_{name.upper()}")
        if field.annotation in (float, float | None):
            assert any(getattr(m, "allow_inf_nan", None) is False for m in field.metadata), f"{name}: allow_inf_nan"
    assert not unbounded, f"numeric settings without finite bounds (ge/gt and le/lt): {unbounded}"


@pytest.mark.parametrize("name", ["arcface", "cli-1a2b3c4d", "faces.v2_eu-west", "q" * 128])
def test_queue_names_without_colons_are_accepted(name, clean_env):
    assert ProducerSettings(queue=name).queue == name


@pytest.mark.parametrize(
    "name, says",
    [
        ("victim:intermediate", "must not contain ':'"),  # rq:queue:victim:intermediate: victim's in-flight list
        ("x:finished", "must not contain ':'"),
        (":", "must not contain ':'"),
        ("", "1 to 128"),
        ("a b", "1 to 128"),
        ("tab\there", "1 to 128"),
        ("new\nline", "1 to 128"),
        ("q" * 129, "1 to 128"),
        ("wild*card", "1 to 128"),
    ],
)
def test_queue_names_that_could_alias_rq_keys_are_refused(name, says, clean_env):
    for cls in (ProducerSettings, WorkerSettings):
        with pytest.raises(ValidationError, match=says.replace("*", r"\*")):
            cls(queue=name)


def test_preprocess_processes_are_bounded_by_cores_and_memory(clean_env):
    from worker.inference.prepool import usable_cores

    most, why = max_preprocess_processes(40_000_000)
    assert 1 <= most <= 2 * usable_cores()
    assert WorkerSettings(preprocess_processes=most).preprocess_processes == most
    with pytest.raises(ValidationError, match=rf"at most {most} preprocessing processes on this machine \({why}"):
        WorkerSettings(preprocess_processes=most + 1)
    assert WorkerSettings(preprocess_processes="auto").preprocess_processes == "auto"
    assert WorkerSettings(preprocess_processes=0).preprocess_processes == 0
    assert process_budget(40_000_000) == 48 * 2**20 + 160_000_000


def test_available_memory_is_the_lower_of_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:    2000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory(cgroup, meminfo) == 2_048_000_000  # no cgroup files: MemAvailable
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("100\n")
    assert available_memory(cgroup, meminfo) == 2_048_000_000  # unlimited container
    (cgroup / "memory.max").write_text(f"{1024**3}\n")
    (cgroup / "memory.current").write_text(f"{256 * 1024**2}\n")
    assert available_memory(cgroup, meminfo) == 768 * 1024**2
    assert available_memory(tmp_path / "none", tmp_path / "none") is None


def test_unknown_variables_name_the_nearest_setting_from_the_environment_and_dotenv(clean_env, tmp_path):
    clean_env.setenv("ARCFACE_TRESHOLD", "0.5")
    clean_env.setenv("ARCFACE_MODEL_PATH", "/m.h5")  # a worker setting: a producer accepts it (shared .env)
    clean_env.setenv("ARCFACE_WAIT_TIMEOUT", "5")  # a producer setting: a worker accepts it
    clean_env.setenv("arcface_queue", "lower")  # pydantic-settings reads names case-insensitively
    clean_env.setenv("ARCFACE_NOT_A_THING", "")  # empty means unset: nothing to refuse
    for name in NOT_SETTINGS:
        clean_env.setenv(name, "1")
    (tmp_path / ".env").write_text("ARCFACE_QUEU=faces\nOTHER_APP=1\n")
    for cls in (ProducerSettings, WorkerSettings):
        assert unknown_variables(cls) == [
            "ARCFACE_TRESHOLD is not a setting: did you mean ARCFACE_THRESHOLD? rename or remove it "
            "(docs/configuration.md lists every setting)",
            "ARCFACE_QUEU (set in .env) is not a setting: did you mean ARCFACE_QUEUE? rename or remove it "
            "(docs/configuration.md lists every setting)",
        ]
    with pytest.raises(ConfigError) as refused:
        load_settings(ProducerSettings)
    assert refused.value.variable == "ARCFACE_TRESHOLD"
    assert refused.value.message.endswith("(and 1 more unknown ARCFACE_* variables)")


def test_face_client_warns_about_unknown_variables_and_still_connects(clean_env, redis_server):
    """The library runs inside another service: an unknown ARCFACE_* variable is a warning there, not a failure."""
    from producer.client.face_client import FaceClient

    clean_env.setenv("ARCFACE_REDIS_URL", redis_server.url)
    clean_env.setenv("ARCFACE_TRESHOLD", "0.5")
    with pytest.warns(UnknownSettingWarning, match="ARCFACE_TRESHOLD is not a setting: did you mean ARCFACE_THRESHOLD"):
        client = FaceClient()
    assert client.connection.ping()
    clean_env.delenv("ARCFACE_TRESHOLD")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownSettingWarning)
        FaceClient()


def test_out_of_range_message_names_the_bound_and_the_default(clean_env):
    clean_env.setenv("ARCFACE_DECODE_TIMEOUT_S", "inf")
    with pytest.raises(ConfigError) as refused:
        load_settings(WorkerSettings)
    assert refused.value.message == (
        "ARCFACE_DECODE_TIMEOUT_S='inf': input should be a finite number; accepted: a finite number > 0 and <= 600: "
        "set a value in that range or unset it for the default 30"
    )
