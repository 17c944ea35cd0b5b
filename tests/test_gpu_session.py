"""bench/gpu_session.sh, the one-command GPU evidence run, rehearsed on the CPU so that it cannot rot.

Its --dry-run goes through the same stages (build, tests, bench, profile) on tiny cases; its
--plan lists the real run's commands, which are checked against the parsers of `rlops bench`
and `rlops profile` and the headline shapes; and its stage machinery is driven with commands
that outlast their budget, to show that a stage is cut at its budget, the next ones still run,
and the files of finished stages are already in the archive.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
STAGES = ["build", "tests", "bench", "profile"]
OUT_FILES = {"session.log", "build.log", "tests.log", "bench.log", "profile.log", "summary.md", "results.tar.gz"}
DEVICE_COMMAND_S = 600  # the device tool runs one command for at most this long
ROW = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) \| (.+) \|$", re.M)


def _plan(*flags: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--plan", *flags], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [line.split("\t") for line in out.splitlines()]


def _stage_rows(summary: str) -> dict[str, tuple[int, int, str]]:
    return {name: (int(budget), int(took), status) for name, budget, took, status in ROW.findall(summary)}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-session")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env={**_env(), "OUT": str(out)},
                          capture_output=True, text=True, timeout=300)
    return proc, out


def _env() -> dict[str, str]:
    """This environment less the script's own settings, so that the defaults are what is tested."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SESSION_", "BUDGET_", "FLOOR_", "RESULTS"))}


def test_dry_run_goes_through_every_stage_and_returns_what_the_device_tool_can(dry_run) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # What comes back from the device tool: at most 8 files, plain names, nothing deeper.
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert all(p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in out.iterdir())
    summary = (out / "summary.md").read_text()
    rows = _stage_rows(summary)
    assert list(rows) == STAGES
    assert all(status == "ok" and took <= budget for budget, took, status in rows.values()), rows
    # The GPU tests were collected (one op's file) and skipped without CUDA.
    assert re.search(r"\d+ skipped", (out / "tests.log").read_text())
    assert re.search(r"^\d+ skipped in [0-9.]+s", summary, re.M), summary
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
        (session_md,) = [n for n in names if n.endswith("-gpu-session.md")]
        assert tar.extractfile(session_md).read().decode() == summary  # the committed copy of the summary
    # One folder per device (here "cpu"), as `tar -xzf results.tar.gz -C bench/results` lays it.
    assert {n.split("/")[0] for n in names} == {"cpu"}
    assert any(n.endswith(".json") and "estimate" not in n for n in names)  # rlops bench --quick
    assert "cpu/estimate.md" in names and "cpu/estimate.json" in names  # rlops profile --estimate


def test_dry_run_packs_each_stages_files_as_the_stage_ends(dry_run) -> None:
    _, out = dry_run
    log = (out / "session.log").read_text()
    # The bench run's files are in the archive before the profile stage starts.
    bench_end = log.index("stage bench: ok")
    profile_start = log.index("stage profile: budget")
    packed = [int(n) for n in re.findall(r"packed (\d+) files", log[:profile_start])]
    assert bench_end < profile_start and packed and packed[-1] >= 3  # the summary, the bench JSON and table
    assert re.search(r"packed \d+ files", log[profile_start:])


def test_plan_runs_the_headline_benchmarks_and_one_profile_within_the_device_limit() -> None:
    from rlops.bench import packed_policy_loss, run
    from rlops.profile import PRESETS
    from rlops.profile_cli import build_parser

    plan = _plan()
    caps = {row[1]: row[2] for row in plan}
    assert int(caps["session"]) <= DEVICE_COMMAND_S - 30  # `timeout -k 10` and packing fit in the margin
    assert int(caps["tests"]) <= 180 and int(caps["bench"]) <= 300
    (tests,) = [shlex.split(row[3]) for row in plan if row[1] == "tests"]
    assert tests[tests.index("-m", 2) + 1] == "gpu" and tests[-1] == "tests"  # every op's GPU tests
    want = {
        # the headline shapes, then small N (the split-vocabulary path) in a run of its own
        "policy_loss": [(16384, 32000), (16384, 151936), (256, 151936), (1024, 151936)],
        "token_stats": [(16384, 32000), (16384, 151936)],
        "linear_policy_loss": [(16384, 151936, 4096)],
        "gae": [(512, 8192)],
        "packed_policy_loss": packed_policy_loss.DEFAULT_SHAPES,
        "objectives": [(16384, 151936)],  # each objective beside the clip (issue 14's 5% check)
    }
    got = {}
    for row in plan:
        if row[1] == "bench":
            words = shlex.split(row[3])
            args = run.build_parser().parse_args(words[words.index("bench") + 1:])
            assert not args.quick and args.providers is None  # every provider that imports
            for op in args.ops:
                got[op] = got.get(op, []) + run._shapes(args.shapes, run.OPS[op], args.quick)
    assert got == want and set(got) == set(run.OPS)
    profiles = [build_parser().parse_args(shlex.split(row[3])[4:]) for row in plan if row[1] == "profile"]
    assert profiles and all(p.model in PRESETS and len(p.response_len) == 1 and not p.estimate for p in profiles)
    assert len({(p.model, p.response_len[0], p.batch) for p in profiles}) == 1  # one preset, one length


def test_dry_plan_is_one_tiny_case_per_stage() -> None:
    plan = _plan("--dry-run")
    by_stage = {stage: [row[3] for row in plan if row[1] == stage] for stage in STAGES}
    assert all(len(commands) == 1 for commands in by_stage.values()), by_stage
    assert "--quick" in by_stage["bench"][0] and "--estimate" in by_stage["profile"][0]
    assert "-m gpu" in by_stage["tests"][0] and "pip" not in by_stage["build"][0]


def test_a_stage_past_its_budget_is_cut_and_the_next_stages_still_run(tmp_path: Path) -> None:
    script = f"""
    source {shlex.quote(str(SCRIPT))}
    OUT={tmp_path}/out SLUG=some-gpu RESULTS_ROOT={tmp_path}/results SESSION_SECONDS=60
    init_session
    first() {{ bounded bench.log 10 touch "$RESULTS/first.json"; }}
    slow() {{ bounded bench.log 100 sleep 30; }}
    after() {{ bounded profile.log 10 touch "$RESULTS/after.json"; }}
    stage first 10 0 first
    stage slow 1 0 slow
    stage after 10 0 after
    stage starved 10 1000 after
    """
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = _stage_rows((tmp_path / "out" / "summary.md").read_text())
    assert [(name, status) for name, (_, _, status) in rows.items()] == [
        ("first", "ok"), ("slow", "timeout"), ("after", "ok"), ("starved", "skipped: no time left")]
    assert rows["slow"][1] <= 3  # cut at its 1 s budget, not after the command's 30 s
    assert "(timed out after 1s: sleep 30)" in (tmp_path / "out" / "bench.log").read_text()
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert {"some-gpu/first.json", "some-gpu/after.json"} <= set(tar.getnames())


def test_scripts_parse_and_the_wheels_folder_is_ignored() -> None:
    for script in (SCRIPT, ROOT / "bench" / "fetch_wheels.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    ignored = subprocess.run(["git", "check-ignore", "-q", "bench/wheels/liger_kernel-0.8.5-py3-none-any.whl"],
                             cwd=ROOT, capture_output=True, timeout=30)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0  # carried to the GPU machine, never committed
