"""A profile knows how clean and how old it is: a contended measurement is made again, then refused as this
machine's profile (kept only with -o, marked contended); ``profile --show`` prints age and cleanliness; plans on a
stale or contended profile say so; a profile of another CPU or other engine code is foreign, and the default profile
is the newest current one. The contention probe is injected: no real load, no real measurement."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from planner_fixtures import cpu_profile

from specplan.catalog import contended_profiles, current_profiles, profile_path, user_profiles_dir
from specplan.cli import main
from specplan.contracts.hardware import CONTENDED_CPU_FRACTION, STALE_PROFILE_S, HardwareProfile, Provenance
from specplan.engine.measure import profiler
from specplan.engine.measure.profiler import MEASURE_ATTEMPTS, ProfileConfig, measure_this_machine
from specplan.errors import ContractError
from specplan.jsonio import load, write_json
from specplan.machine import engine_digest, here

GOLDEN_TARGET = "tests/golden/demo-target.json"


def utc(days_ago: float) -> str:
    t = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def profile_of(days_ago: float = 0.0, others: float | None = 0.02) -> HardwareProfile:
    p = cpu_profile()
    pv = p.provenance.model_copy(update={"created_utc": utc(days_ago), "others_cpu_fraction": others})
    return p.model_copy(update={"provenance": pv})


class Probe:
    """A ``CpuUsage`` stand-in: each measurement reports the next of ``fractions`` (the last one repeats)."""

    def __init__(self, fractions: list[float]):
        self.fractions, self.made = list(fractions), 0

    def __call__(self) -> "Probe":
        self.made += 1
        return self

    def others_fraction(self) -> float:
        return self.fractions[min(self.made, len(self.fractions)) - 1]


@pytest.fixture
def fake_measure(monkeypatch):
    """Measuring returns a fixed profile at once (the probe's reading goes into it as in a real measurement)."""
    monkeypatch.setattr(profiler, "prepare", lambda config: config)
    monkeypatch.setattr(profiler, "_measure", lambda config, on_tick: profile_of(others=None))


def test_a_contended_measurement_is_made_again_until_clean(fake_measure):
    probe = Probe([0.5, 0.4, 0.03])
    m = measure_this_machine(ProfileConfig.tiny(), probe=probe)
    assert m.attempts == 3 and probe.made == 3
    assert m.profile.provenance.others_cpu_fraction == 0.03 and not m.profile.provenance.contended


def test_after_the_last_attempt_the_contended_profile_is_returned_marked(fake_measure):
    probe = Probe([0.47])
    m = measure_this_machine(ProfileConfig.tiny(), probe=probe)
    assert m.attempts == MEASURE_ATTEMPTS == probe.made
    assert m.profile.provenance.others_cpu_fraction == 0.47 and m.profile.provenance.contended


def test_a_clean_measurement_is_made_once(fake_measure):
    probe = Probe([0.01, 0.9])
    assert measure_this_machine(ProfileConfig.tiny(), probe=probe).attempts == 1


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def test_cli_refuses_a_contended_profile_as_this_machines(fake_measure, monkeypatch, tmp_path):
    monkeypatch.setattr(profiler, "CpuUsage", Probe([0.47]))
    r = run("profile", "--quick")
    assert r.exit_code == 2, r.output
    (line,) = [line for line in r.output.splitlines() if line.strip()]  # one line (the progress bar left a blank)
    assert line.startswith("Error: refused") and "47%" in line and "idle machine" in line
    assert not list(user_profiles_dir().glob("*.json"))
    (kept,) = contended_profiles()  # kept apart, marked, for --profile only
    assert f"--profile {kept}" in line and load(HardwareProfile, kept).provenance.contended
    r = run("profile", "--quick", "-o", user_profiles_dir() / "mine.json")  # -o into the cache is no way around it
    assert r.exit_code == 2 and "refused" in r.output
    assert not list(user_profiles_dir().glob("*.json"))


def test_cli_writes_a_contended_profile_only_to_o_marked(fake_measure, monkeypatch, tmp_path):
    monkeypatch.setattr(profiler, "CpuUsage", Probe([0.47]))
    out = tmp_path / "contended.json"
    r = run("profile", "--quick", "-o", out)
    assert r.exit_code == 0, r.output
    assert f"{MEASURE_ATTEMPTS} attempts" in r.output and "CONTENDED" in r.output and "warning" in r.output
    p = load(HardwareProfile, out)
    assert p.provenance.others_cpu_fraction == 0.47 and p.provenance.contended
    assert not list(user_profiles_dir().glob("*.json"))


def test_cli_stores_a_clean_profile_as_this_machines(fake_measure, monkeypatch):
    monkeypatch.setattr(profiler, "CpuUsage", Probe([0.02]))
    r = run("profile", "--quick")
    assert r.exit_code == 0, r.output
    (path,) = user_profiles_dir().glob("*.json")
    assert load(HardwareProfile, path).provenance.others_cpu_fraction == 0.02 and "clean: other processes used 2%" in r.output


@pytest.mark.parametrize("days,others,says", [
    (0.0, 0.03, ["measured 0 minutes ago;", "clean: other processes used 3% of the CPUs"]),
    (10.0, 0.03, ["measured 10.0 days ago (stale", "clean"]),
    (2.0, 0.47, ["measured 2.0 days ago;", "CONTENDED: other processes used 47%"]),
    (0.5, None, ["measured 12.0 hours ago;", "cleanliness not recorded"]),
])
def test_show_prints_age_and_cleanliness(tmp_path, days, others, says):
    r = run("profile", "--show", write_json(tmp_path / "p.json", profile_of(days, others)))
    assert r.exit_code == 0, r.output
    first = r.output.splitlines()[1]
    assert all(s in first for s in says), first


def test_show_of_a_published_profile_has_no_age():
    r = run("profile", "--show", "rtx4090-pcie4")
    assert r.exit_code == 0 and "ago" not in r.output and "stale" not in r.output


def test_warnings_of_stale_and_contended_profiles():
    pv = profile_of(10.0, 0.47).provenance
    lines = pv.warnings()
    assert len(lines) == 2 and "47%" in lines[0] and "10.0 days old" in lines[1]
    assert profile_of(1.0, 0.02).provenance.warnings() == []
    assert profile_of(STALE_PROFILE_S / 86400 - 0.01, CONTENDED_CPU_FRACTION).provenance.warnings() == []  # at the limits
    published = Provenance(kind="published", created_utc=utc(400), source="a datasheet")
    assert published.warnings() == [] and not published.stale()


def test_search_on_a_stale_contended_profile_says_so(tmp_path):
    path = write_json(tmp_path / "p.json", profile_of(30.0, 0.3))
    r = run("search", "--model", GOLDEN_TARGET, "--vram", "1", "--profile", path, "--draft", "none", "--top", "1")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "30%" in warnings[0] and "30.0 days old" in warnings[1]
    clean = write_json(tmp_path / "clean.json", profile_of(0.0, 0.0))
    r = run("search", "--model", GOLDEN_TARGET, "--vram", "1", "--profile", clean, "--draft", "none", "--top", "1")
    assert r.exit_code == 0 and "warning:" not in r.output


def test_provenance_round_trip_and_range(tmp_path):
    p = profile_of(3.0, 0.25)
    assert load(HardwareProfile, write_json(tmp_path / "p.json", p)) == p
    doc = p.model_dump(mode="json")
    doc["provenance"]["others_cpu_fraction"] = 1.5
    bad = tmp_path / "bad.json"
    bad.write_text(__import__("json").dumps(doc))
    with pytest.raises(ContractError, match="others_cpu_fraction"):
        load(HardwareProfile, bad)


def foreign_of(cpu: str | None, digest: str | None, days_ago: float = 0.0) -> HardwareProfile:
    p = profile_of(days_ago)
    return p.model_copy(update={"provenance": p.provenance.model_copy(update={"cpu_name": cpu,
                                                                              "engine_digest": digest})})


def test_a_profile_of_another_cpu_or_other_engine_code_is_foreign():
    cpu, digest = here()
    assert foreign_of(cpu, digest).provenance.foreign(cpu, digest) == []
    assert foreign_of(None, None).provenance.foreign(cpu, digest) == []  # not recorded: nothing to compare
    other_cpu = foreign_of("Intel Xeon (2 logical cores)", digest).provenance.foreign(cpu, digest)
    assert len(other_cpu) == 1 and "another CPU (Intel Xeon" in other_cpu[0]
    other_code = foreign_of(cpu, "0123456789abcdef").provenance.warnings(here=(cpu, digest))
    assert len(other_code) == 1 and "other engine code (digest 0123456789abcdef" in other_code[0]
    assert Provenance(kind="published", created_utc=utc(0), source="x", cpu_name="y").foreign(cpu, digest) == []


def test_the_default_profile_is_the_newest_current_one():
    """A newer profile of other engine code (or another CPU, or stale, or one that does not record them) is passed
    over for an older current one; with none current, the newest measured one is used and its warnings say why."""
    cpu, digest = here()
    d = user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, p) in enumerate([("current", foreign_of(cpu, digest, 1.0)),
                                   ("stale", foreign_of(cpu, digest, 30.0)),
                                   ("other-cpu", foreign_of("Intel Xeon (2 logical cores)", digest)),
                                   ("other-code", foreign_of(cpu, "0123456789abcdef")),
                                   ("unrecorded", foreign_of(None, None, 2.0))]):
        paths[name] = write_json(d / f"{name}.json", p.model_copy(update={"name": name}))
        os.utime(paths[name], (1e9 + i, 1e9 + i))  # file times: "current" the oldest, "unrecorded" the newest
    try:
        assert current_profiles() == [paths["current"]] and profile_path(None) == paths["current"]
        paths["current"].unlink()
        assert current_profiles() == [] and profile_path(None) == paths["unrecorded"]
        r = run("profile", "--show", "other-code")
        assert r.exit_code == 0 and "warning: the profile was measured with other engine code" in r.output
    finally:
        for p in paths.values():
            p.unlink(missing_ok=True)


def test_the_engine_digest_follows_the_engine_code():
    assert len(engine_digest()) == 16 and engine_digest() == here()[1]
    assert engine_digest() == subprocess.run(
        [sys.executable, "-c", "from specplan.machine import engine_digest; print(engine_digest())"],
        capture_output=True, text=True, check=True).stdout.strip()
