"""`rlops train` refuses a bad value before any work: one line on stderr naming the option as
typed, exit status 2, nothing created under --out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlops import cli


def _cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments after `rlops train`, the option the message must name)."""
    (tmp / "a-file").write_text("")
    (tmp / "not-a-model").mkdir()
    cases = [
        (["sft", "--steps", "-1"], "--steps"),
        (["sft", "--steps", "three"], "--steps"),  # argparse's own error, one line too
        (["sft", "--lr", "-1"], "--lr"),
        (["sft", "--save-every", "0"], "--save-every"),
        (["sft", "--batch-size", "0"], "--batch-size"),
        (["sft", "--heldout", "-5"], "--heldout"),
        (["sft", "--heldout", "10000"], "--heldout"),
        (["sft", "--demos", "0"], "--demos"),
        (["sft", "--max-grad-norm", "nan"], "--max-grad-norm"),
        (["sft", "--device", "tpu"], "--device"),
        (["sft", "--model", str(tmp / "missing" / "model")], "--model"),
        (["sft", "--model", str(tmp / "not-a-model")], "--model"),
        (["sft", "--out", str(tmp / "a-file" / "run")], "--out"),
        (["reward", "--weight-decay", "-0.1"], "--weight-decay"),
        (["grpo", "--group-size", "1"], "--group-size"),
        (["grpo", "--sft-steps", "0"], "--sft-steps"),
        (["grpo", "--loss-agg", "mean"], "--loss-agg"),
        (["grpo", "--clip-low", "-0.2"], "--clip-low"),
        (["ppo", "--gamma", "1.5"], "--gamma"),
        (["ppo", "--kl-mode", "both"], "--kl-mode"),
        (["ppo", "--reward-model", str(tmp / "missing")], "--reward-model"),
        (["ppo", "--reward-model", str(tmp / "not-a-model")], "--reward-model"),
        (["r1-toy", "--grpo-lr", "0"], "--grpo-lr"),
        (["r1-toy", "--demos", "9500"], "--demos"),
        (["r1-toy", "--hidden-size", "0"], "--hidden-size"),
        (["r1-toy", "--seed", "-1"], "--seed"),
    ]
    if not torch.cuda.is_available():
        cases.append((["sft", "--device", "cuda"], "--device"))
    return cases


def _status(argv: list[str]) -> int | str | None:
    """cli.main's exit status; argparse's own errors exit through SystemExit."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


def test_bad_values_are_one_line_naming_the_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    for args, option in _cases(tmp_path):
        argv = ["train", *args] if "--out" in args else ["train", *args, "--out", str(out)]
        status = _status(argv)
        err = capsys.readouterr().err
        assert status == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0] and f" {option} " in lines[0].replace(":", " "), (args, err)
        assert "Traceback" not in err, (args, err)
        assert not out.exists(), args  # checked before anything is written
    assert not (tmp_path / "a-file").is_dir()


def test_good_values_pass_the_checks(tmp_path: Path) -> None:
    from rlops.cli_checks import check_model, check_out

    check_model("org/name")  # a Hugging Face repo id is left to transformers
    check_out(str(tmp_path / "new" / "run"))
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())


def test_every_option_has_a_help_line_and_its_choices() -> None:
    """`rlops train <kind> --help`: every option says what it is beyond its default, and an
    option with a fixed set of values lists them (argparse then refuses any other)."""
    from rlops.cli_help import CHOICES

    subparsers = next(a for a in cli.train_parser()._actions if a.dest == "kind")
    for kind, sub in subparsers.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            text = (action.help or "").split("(default:")[0].strip()
            assert len(text) > 10, f"rlops train {kind} {action.option_strings[0]} has no help line"
            if action.dest in CHOICES:
                assert tuple(action.choices) == CHOICES[action.dest], action.option_strings[0]


def test_packing_flag_parses() -> None:
    from rlops.cli_checks import check_train_args

    parser = cli.train_parser()
    for kind in ("grpo", "ppo"):
        assert parser.parse_args([kind]).packing is False
        args = parser.parse_args([kind, "--packing"])
        args.out_dir = None  # nothing to create
        assert args.packing is True and check_train_args(args, args.config_class).packing is True
        assert parser.parse_args([kind, "--packing", "--no-packing"]).packing is False


def test_ctrl_c_says_how_to_resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train_one", interrupted)
    assert cli.main(["train", "sft", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "resume" in err and str(tmp_path / "run") in err


@pytest.mark.parametrize("missing", ["transformers", "tqdm"])
def test_train_names_a_missing_extra(missing: str, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A plain `pip install .` lacks the trainers' extras: one line saying which to install, exit 2."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert cli.main(["train", "sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and missing in err and "pip install 'rlops[train]'" in err
