"""A catalogue of bad inputs to every `mindset` command.

Each case runs the real entry point in-process (``mindset.cli.run``, the function the console
script calls; a few run in real subprocesses too) and must end with exit status 2, one
non-empty stderr line starting ``mindset: error:`` that names the problem, no traceback, and
no file created, changed or removed in the data directory (a fresh ``MINDSET_HOME`` per case),
the shared assets or the case's own temporary directory. Only tiny models load.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mindset.cli import run
from tests.bad_input_assets import (
    assert_one_line_error,
    assert_unchanged,
    build_assets,
    expand,
    snapshot,
)
from tests.conftest import REPO_ROOT

Case = tuple[str, list[str], str]  # id, argv (with {a} {t} {busy} {free} {unwritable}), regex


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-input-assets")
    build_assets(root)
    return root


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.fixture(autouse=True)
def nothing_long_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """A case that wrongly passed validation must fail here, not open a workbench or a server."""
    import engine.llm.server
    import mindset.app
    import mindset.web

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the bad input was accepted: a workbench or server would start")

    monkeypatch.setattr(mindset.app, "run_app", refuse)
    monkeypatch.setattr(mindset.web, "serve_web", refuse)
    monkeypatch.setattr(engine.llm.server, "serve", refuse)


# --- the catalogue ----------------------------------------------------------------------------

NO_PORT = r"must be positive|not a port|not a whole number"
NO_LOG = r"no such|does not exist|no interaction log"


def distill(*extra: str, data: bool = True) -> list[str]:
    argv = ["distill", "--teacher", "tiny-llama", "--layers", "1", "--out", "{t}/run",
            "--steps", "2", "--block-size", "16", "--batch-size", "2", "--eval-every", "1"]
    return argv + (["--data", "{a}/text.txt"] if data else []) + list(extra)


def hp(*pairs: str, memory: str = "featural") -> list[str]:
    args = ["--memory", memory]
    for pair in pairs:
        args += ["--hparam", pair]
    return distill(*args)


def evaluate(*extra: str, model: str = "tiny-llama", data: str = "{a}/text.txt") -> list[str]:
    return ["eval", "--model", model, "--data", data, *extra]


def complete(*extra: str, prompt: str = "Once upon") -> list[str]:
    return ["complete", "--model", "tiny-llama", *extra, prompt]


def serve(*extra: str) -> list[str]:
    return ["serve", "--model", "tiny-llama", "--port", "{free}", *extra]


LOG = "{a}/log.db"

WORKBENCH: list[Case] = [
    ("unknown-command", ["frobnicate"], "invalid choice"),
    ("unknown-flag", ["--bogus"], "unrecognized arguments"),
    ("port-zero", ["--port", "0"], "must be positive"),
    ("port-negative", ["--port", "-1"], "must be positive"),
    ("port-text", ["--port", "http"], "not a whole number"),
    ("port-float", ["--port", "80.5"], "not a whole number"),
    ("port-too-big", ["--port", "70000"], "not a port"),
    ("port-empty", ["--port", ""], "not a whole number"),
    ("web-host-256", ["--web", "--host", "256.1.1.1"], "256.1.1.1"),
    ("web-host-empty", ["--web", "--host", ""], "not an IP address"),
    ("web-host-space", ["--web", "--host", "bad host"], "not an IP address"),
    ("web-host-five-octets", ["--web", "--host", "1.2.3.4.5"], "not an IP address"),
    ("web-host-not-here", ["--web", "--host", "192.0.2.1", "--port", "{free}"],
     "cannot listen"),
    ("web-port-busy", ["--web", "--port", "{busy}"], "cannot listen"),
    ("model-empty", ["--model", ""], "--model is empty"),
    ("model-blank", ["--model", "   "], "--model is empty"),
    ("web-model-empty", ["--web", "--model", ""], "--model is empty"),
    ("model-missing", ["--model", "{a}/nope"], "no such path"),
    ("model-file", ["--model", "{a}/text.txt"], "is a file"),
    ("model-bin-only", ["--model", "{a}/bin_only"], "holds only pytorch_model.bin"),
    ("model-layers-negative", ["--model", "{a}/layers_neg"], "num_hidden_layers=-3"),
    ("web-model-bad-json", ["--web", "--model", "{a}/bad_json"], "not valid JSON"),
]

EVAL: list[Case] = [
    ("no-model", ["eval", "--data", "{a}/text.txt"], "required"),
    ("no-data", ["eval", "--model", "tiny-llama"], "required"),
    ("model-empty", evaluate(model=""), "--model is empty"),
    ("model-unknown", evaluate(model="nope"), "unknown model 'nope'"),
    ("model-missing-dir", evaluate(model="{a}/nope/"), "no such path"),
    ("model-file", evaluate(model="{a}/text.txt"), "is a file"),
    ("model-no-config", evaluate(model="{a}/empty_dir"), r"no config\.json"),
    ("model-bin-only", evaluate(model="{a}/bin_only"),
     r"holds only pytorch_model\.bin; Mindset loads safetensors only \(never pickles\)"),
    ("model-bad-json", evaluate(model="{a}/bad_json"), "not valid JSON"),
    ("model-json-list", evaluate(model="{a}/list_json"), "not a JSON object"),
    ("model-bert", evaluate(model="{a}/bert"), "'bert'.*supported families"),
    ("layers-negative", evaluate(model="{a}/layers_neg"), "num_hidden_layers=-3"),
    ("layers-zero", evaluate(model="{a}/layers_zero"), "num_hidden_layers=0"),
    ("layers-text", evaluate(model="{a}/layers_text"), "num_hidden_layers='abc'"),
    ("layers-float", evaluate(model="{a}/layers_float"), "num_hidden_layers=2.5"),
    ("layers-missing", evaluate(model="{a}/layers_missing"), "lacks num_hidden_layers"),
    ("layers-huge", evaluate(model="{a}/layers_huge"), "more than this machine"),
    ("hidden-zero", evaluate(model="{a}/hidden_zero"), "hidden_size=0"),
    ("heads-mismatch", evaluate(model="{a}/heads_mismatch"), "attention heads"),
    ("vocab-negative", evaluate(model="{a}/vocab_neg"), "vocab_size=-1"),
    ("no-weights", evaluate(model="{a}/no_weights"), "no weight files"),
    ("corrupt-weights", evaluate(model="{a}/corrupt_weights"), "corrupt or truncated"),
    ("student-bad-json", evaluate(model="{a}/student_bad_json"), "unreadable"),
    ("student-json-list", evaluate(model="{a}/student_list_json"), "not a JSON object"),
    ("student-bad-family", evaluate(model="{a}/student_bad_family"), "family='bert'"),
    ("student-no-weights", evaluate(model="{a}/student_no_weights"), "is missing"),
    ("data-missing", evaluate(data="{a}/none.txt"), "no such file"),
    ("data-empty", evaluate(data="{a}/empty.txt"), "is empty"),
    ("data-blank", evaluate(data="{a}/blank.txt"), "is empty"),
    ("data-binary", evaluate(data="{a}/binary.bin"), "not UTF-8"),
    ("data-directory", evaluate(data="{a}/empty_dir"), "is a directory"),
    ("data-device", evaluate(data="/dev/zero"), "not a regular file"),
    ("tokens-zero", evaluate("--tokens", "0"), "must be positive"),
    ("tokens-negative", evaluate("--tokens", "-5"), "must be positive"),
    ("tokens-text", evaluate("--tokens", "lots"), "not a whole number"),
    ("tokens-float", evaluate("--tokens", "1.5"), "not a whole number"),
    ("tokens-one", evaluate("--tokens", "1"), "out of range"),
    ("tokens-huge", evaluate("--tokens", "1000000000"), "out of range"),
    ("tokens-overflow", evaluate("--tokens", "9" * 30), "too large"),
    ("window-zero", evaluate("--window", "0"), "must be positive"),
    ("window-one", evaluate("--window", "1"), "too small"),
    ("window-text", evaluate("--window", "wide"), "not a whole number"),
    ("window-nan", evaluate("--window", "nan"), "not a whole number"),
    ("window-beyond-context", evaluate("--window", "99999"), "exceeds the model's context"),
]

DISTILL: list[Case] = [
    ("no-layers", ["distill", "--teacher", "tiny-llama"], "required"),
    ("layers-text", distill("--layers", "abc"), "bad layer list"),
    ("layers-reversed", distill("--layers", "3-1"), "empty layer range"),
    ("layers-double-comma", distill("--layers", "1,,2"), "empty item"),
    ("layers-trailing-comma", distill("--layers", "1,"), "empty item"),
    ("layers-out-of-range", distill("--layers", "99"), "unknown layer 99"),
    ("layers-negative-out-of-range", distill("--layers=-9"), "unknown layer -9"),
    ("layers-huge-range", distill("--layers", "0-999999999999"), "unknown layer"),
    ("layers-empty", distill("--layers", ""), "layers is empty"),
    ("memory-unknown", distill("--memory", "magic"), "invalid choice"),
    ("steps-zero", distill("--steps", "0"), "must be positive"),
    ("steps-negative", distill("--steps", "-3"), "must be positive"),
    ("steps-text", distill("--steps", "many"), "not a whole number"),
    ("steps-float", distill("--steps", "2.5"), "not a whole number"),
    ("steps-huge", distill("--steps", "2000000000"), "steps=2000000000 is more than"),
    ("local-steps-negative", distill("--local-steps", "-1"), "must not be negative"),
    ("local-tokens-negative", distill("--local-tokens", "-1"), "must not be negative"),
    ("local-batch-tokens-zero", distill("--local-batch-tokens", "0"), "must be positive"),
    ("block-size-zero", distill("--block-size", "0"), "must be positive"),
    ("block-size-text", distill("--block-size", "big"), "not a whole number"),
    ("block-size-beyond-context", distill("--block-size", "100000"), "teacher's context"),
    ("batch-size-zero", distill("--batch-size", "0"), "must be positive"),
    ("batch-size-negative", distill("--batch-size", "-2"), "must be positive"),
    ("batch-size-huge", distill("--batch-size", "1000000000000"), "more than this machine"),
    ("lr-zero", distill("--lr", "0"), "must be positive"),
    ("lr-negative", distill("--lr", "-0.1"), "must be positive"),
    ("lr-nan", distill("--lr", "nan"), "not a finite number"),
    ("lr-inf", distill("--lr", "inf"), "not a finite number"),
    ("lr-text", distill("--lr", "fast"), "not a number"),
    ("value-lr-nan", distill("--value-lr", "NaN"), "not a finite number"),
    ("value-lr-zero", distill("--value-lr", "0"), "must be positive"),
    ("temperature-zero", distill("--temperature", "0"), "must be positive"),
    ("temperature-inf", distill("--temperature", "inf"), "not a finite number"),
    ("ce-weight-nan", distill("--ce-weight", "nan"), "nan"),
    ("ce-weight-inf", distill("--ce-weight", "inf"), "inf"),
    ("ce-weight-negative", distill("--ce-weight", "-1"), "ce_weight|ce-weight"),
    ("ce-weight-text", distill("--ce-weight", "heavy"), "not a number|invalid float"),
    ("clip-nan", distill("--clip", "nan"), "not a finite number"),
    ("clip-negative", distill("--clip", "-1"), "must be positive"),
    ("warmup-negative", distill("--warmup", "-1"), "must not be negative"),
    ("seed-negative", distill("--seed", "-1"), "must not be negative"),
    ("seed-text", distill("--seed", "lucky"), "not a whole number"),
    ("seed-huge", distill("--seed", str(2**40)), "seed="),
    ("threads-negative", distill("--threads", "-1"), "must not be negative"),
    ("threads-text", distill("--threads", "all"), "not a whole number"),
    ("threads-huge", distill("--threads", "100000"), "threads=100000"),
    ("eval-every-zero", distill("--eval-every", "0"), "must be positive"),
    ("checkpoint-every-zero", distill("--checkpoint-every", "0"), "must be positive"),
    ("schedule-unknown", distill("--schedule", "wavy"), "invalid choice"),
    ("hparam-no-equals", hp("value_dim"), "not KEY=VALUE"),
    ("hparam-empty-key", hp("=5"), "not KEY=VALUE"),
    ("hparam-value-dim-text", hp("value_dim=abc"), "value_dim='abc' must be an integer"),
    ("hparam-value-dim-float", hp("value_dim=1.5"), "value_dim=1.5 must be an integer"),
    ("hparam-value-dim-negative", hp("value_dim=-1"), "value_dim=-1"),
    ("hparam-value-dim-nan", hp("value_dim=NaN"), "value_dim=nan"),
    ("hparam-num-subkeys-huge", hp("num_subkeys=1000000"), "needs about .* more than this"),
    ("hparam-heads-huge", hp("heads=1000000000"), "needs about .* more than this"),
    ("hparam-heads-zero", hp("heads=0"), "heads=0 must be a positive integer"),
    ("hparam-heads-bool", hp("heads=true"), "heads=True must be an integer"),
    ("hparam-topk-zero", hp("topk=0"), "topk=0 must be a positive integer"),
    ("hparam-topk-huge", hp("topk=5000", "num_subkeys=6000"), "at most 1024"),
    ("hparam-topk-above-subkeys", hp("topk=200"), "exceeds num_subkeys"),
    ("hparam-query-dim-odd", hp("query_dim=3"), "is odd"),
    ("hparam-keys-unknown", hp("keys=magic"), "not a featural key kind"),
    ("hparam-gate-text", hp("gate=maybe"), "true or false"),
    ("hparam-unknown-key", hp("bogus=1"), "unknown featural hyper-parameter"),
    ("hparam-init-unknown", hp("init=magic"), "not an initialisation"),
    ("hparam-flat-activation", hp("keys=flat", "activation=nope"), "activation='nope'"),
    ("hparam-flat-slots-beyond-mlp", hp("keys=flat", "slots=999999"), "exceeds the teacher"),
    ("assoc-decay-text", hp("decay=abc", memory="associative"), "decay='abc'"),
    ("assoc-decay-zero", hp("decay=0", memory="associative"), r"decay=0 must be in"),
    ("assoc-decay-above-one", hp("decay=2", memory="associative"), r"decay=2 must be in"),
    ("assoc-novelty-nan", hp("novelty_threshold=NaN", memory="associative"),
     "novelty_threshold=nan"),
    ("assoc-novelty-negative", hp("novelty_threshold=-1", memory="associative"), ">= 0"),
    ("assoc-merge-infinite", hp("merge_threshold=Infinity", memory="associative"),
     "merge_threshold=inf"),
    ("assoc-capacity-zero", hp("capacity=0", memory="associative"), "capacity=0"),
    ("assoc-capacity-huge", hp("capacity=1000000000000", memory="associative"),
     "more than this machine"),
    ("assoc-heads-huge", hp("heads=1000000000", memory="associative"), "more than this"),
    ("assoc-insert-unknown", hp("insert=sometimes", memory="associative"), "insert="),
    ("assoc-topk-above-capacity", hp("topk=100", "capacity=10", memory="associative"),
     "exceeds capacity"),
    ("assoc-unknown-key", hp("bogus=1", memory="associative"), "unknown associative"),
    ("dense-width-zero", hp("width=0", memory="dense"), "width=0"),
    ("dense-width-text", hp("width=abc", memory="dense"), "width='abc'"),
    ("dense-unknown-key", hp("bogus=1", memory="dense"), "unknown dense"),
    ("dense-width-huge", hp("width=1000000000000", memory="dense"), "more than this"),
    ("dense-width-beyond-mlp", hp("init=mlp", "width=100000", memory="dense"),
     "exceeds the teacher"),
    ("teacher-empty", distill("--teacher", ""), "teacher is empty"),
    ("teacher-missing", distill("--teacher", "{a}/nope/"), "no such path"),
    ("teacher-file", distill("--teacher", "{a}/text.txt"), "is a file"),
    ("teacher-bin-only", distill("--teacher", "{a}/bin_only"), "holds only pytorch_model"),
    ("teacher-layers-negative", distill("--teacher", "{a}/layers_neg"),
     "num_hidden_layers=-3"),
    ("teacher-bert", distill("--teacher", "{a}/bert"), "'bert'"),
    ("teacher-is-a-student", distill("--teacher", "{a}/student"), "is a student"),
    ("data-missing", distill("--data", "{a}/none.txt", data=False), "no such file"),
    ("data-empty-file", distill("--data", "{a}/empty.txt", data=False), "no text"),
    ("data-blank-file", distill("--data", "{a}/blank.txt", data=False), "no text"),
    ("data-binary", distill("--data", "{a}/binary.bin", data=False), "not UTF-8"),
    ("data-empty-dir", distill("--data", "{a}/empty_dir", data=False), "empty folder"),
    ("data-hidden-only-dir", distill("--data", "{a}/hidden_dir", data=False), "empty folder"),
    ("data-binary-dir", distill("--data", "{a}/binary_dir", data=False), "not UTF-8"),
    ("data-device", distill("--data", "/dev/zero", data=False), "not a regular file"),
    ("out-regular-file", distill("--out", "{a}/text.txt"), "file|directory"),
    ("out-under-a-file", distill("--out", "{a}/text.txt/run"), "file|directory"),
    ("out-proc", distill("--out", "/proc/mindset-run"), "/proc"),
    ("out-unwritable", distill("--out", "{unwritable}"), "writ|permi|cannot"),
    ("out-existing-run", distill("--out", "{a}/run_existing"), "already holds a run|checkpoint"),
    ("resume-without-out", ["distill", "--layers", "1", "--resume"], "--resume needs --out"),
    ("resume-empty-dir", distill("--resume", "--out", "{a}/empty_dir"), "does not exist"),
    ("resume-missing-dir", distill("--resume", "--out", "{t}/gone"), "does not exist"),
    ("resume-bad-json", distill("--resume", "--out", "{a}/run_bad_json"), "not valid JSON"),
    ("resume-unknown-keys", distill("--resume", "--out", "{a}/run_unknown_keys"),
     "unknown distillation settings"),
    ("resume-bad-types", distill("--resume", "--out", "{a}/run_bad_types"),
     "steps='abc' must be an integer"),
    ("resume-nan-lr", distill("--resume", "--out", "{a}/run_nan_lr"), "lr=nan"),
    ("resume-in-background", distill("--resume", "--background", "--out", "{a}/run_valid"),
     "--background cannot resume"),
]

SERVE: list[Case] = [
    ("host-256", serve("--host", "256.1.1.1"), "256.1.1.1"),
    ("host-empty", serve("--host", ""), "host|listen"),
    ("port-zero", serve("--port", "0"), NO_PORT),
    ("port-too-big", serve("--port", "70000"), NO_PORT),
    ("port-text", serve("--port", "web"), NO_PORT),
    ("port-busy", serve("--port", "{busy}"), "cannot listen"),
    ("model-empty", serve("--model", ""), "empty"),
    ("model-missing", serve("--model", "{a}/nope/"), "no such path"),
    ("model-bin-only", serve("--model", "{a}/bin_only"), "pytorch_model.bin"),
    ("model-layers-negative", serve("--model", "{a}/layers_neg"), "num_hidden_layers=-3"),
    ("unknown-flag", serve("--workers", "4"), "unrecognized arguments"),
]

LOGS: list[Case] = [
    ("db-in-missing-dir", ["logs", "--db", "{t}/no/dir/log.db"], NO_LOG),
    ("db-missing-file", ["logs", "--db", "{t}/log.db"], NO_LOG),
    ("db-is-a-directory", ["logs", "--db", "{a}/empty_dir"], "directory"),
    ("db-not-a-database", ["logs", "--db", "{a}/text.txt"], "unreadable|not a"),
    ("limit-zero", ["logs", "--db", LOG, "--limit", "0"], "must be positive"),
    ("limit-negative", ["logs", "--db", LOG, "--limit", "-4"], "must be positive"),
    ("limit-text", ["logs", "--db", LOG, "--limit", "all"], "not a whole number"),
    ("limit-overflow", ["logs", "--db", LOG, "--limit", "9" * 30], "too large"),
    ("list-limit-zero", ["logs", "--db", LOG, "list", "-n", "0"], "must be positive"),
    ("show-unknown-id", ["logs", "--db", LOG, "show", "nope"], "nope"),
    ("show-empty-id", ["logs", "--db", LOG, "show", ""], "give an? .*id"),
    ("show-no-id", ["logs", "--db", LOG, "show"], "required"),
    ("show-unknown-in-fresh-home", ["logs", "show", "nope"], "nope|no interaction"),
    ("export-unknown", ["logs", "--db", LOG, "export", "nope"], "nope"),
    ("export-bad-format", ["logs", "--db", LOG, "export", "conv-1", "--format", "xml"],
     "invalid choice"),
    ("export-output-is-dir", ["logs", "--db", LOG, "export", "conv-1", "-o", "{a}/empty_dir"],
     "is a directory"),
    ("export-output-missing-dir",
     ["logs", "--db", LOG, "export", "conv-1", "-o", "{t}/no/dir/out.md"],
     "cannot write|no such"),
    ("unknown-action", ["logs", "--db", LOG, "frob"], "invalid choice"),
]

COMPLETE: list[Case] = [
    ("temperature-denormal", complete("--temperature", "1e-45"), "temperature"),
    ("temperature-nan", complete("--temperature", "nan"), "temperature"),
    ("temperature-negative", complete("--temperature", "-1"), "temperature"),
    ("temperature-inf", complete("--temperature", "inf"), "temperature"),
    ("temperature-text", complete("--temperature", "hot"), "temperature|number"),
    ("top-p-zero", complete("--top-p", "0"), "top.p"),
    ("top-p-above-one", complete("--top-p", "1.5"), "top.p"),
    ("top-p-nan", complete("--top-p", "nan"), "top.p"),
    ("top-k-negative", complete("--top-k", "-1"), "top.k"),
    ("top-k-text", complete("--top-k", "some"), "top.k|whole number|invalid int"),
    ("max-tokens-zero", complete("--max-tokens", "0"), "must be positive"),
    ("max-tokens-text", complete("--max-tokens", "lots"), "not a whole number"),
    ("max-tokens-overflow", complete("--max-tokens", "9" * 30), "too large"),
    ("repetition-penalty-zero", complete("--repetition-penalty", "0"), "repetition.penalty"),
    ("repetition-penalty-nan", complete("--repetition-penalty", "nan"), "repetition.penalty"),
    ("seed-text", complete("--seed", "lucky"), "seed|whole number|invalid int"),
    ("stop-empty", complete("--stop", ""), "stop"),
    ("no-prompt", ["complete", "--model", "tiny-llama"], "required"),
    ("model-empty", ["complete", "--model", "", "hi"], "empty"),
    ("model-missing", ["complete", "--model", "{a}/nope/", "hi"], "no such path|unknown"),
    ("model-bin-only", ["complete", "--model", "{a}/bin_only", "hi"], "pytorch_model.bin"),
    ("prompt-not-utf8", complete(prompt="caf\udce9"), "not valid UTF-8"),
]

GROUPS = {"workbench": WORKBENCH, "eval": EVAL, "distill": DISTILL, "serve": SERVE,
          "logs": LOGS, "complete": COMPLETE}
CATALOGUE: list[Case] = [(f"{group}-{case_id}", argv, expect)
                         for group, cases in GROUPS.items() for case_id, argv, expect in cases]


def test_the_catalogue_is_large_and_covers_every_command() -> None:
    assert len(CATALOGUE) >= 120
    assert len({case_id for case_id, _, _ in CATALOGUE}) == len(CATALOGUE)
    commands = {argv[0] for _, argv, _ in CATALOGUE}
    assert {"eval", "distill", "serve", "logs", "complete", "--web", "--model"} <= commands


@pytest.mark.parametrize("argv, expect", [(a, e) for _, a, e in CATALOGUE],
                         ids=[case_id for case_id, _, _ in CATALOGUE])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    argv: list[str], expect: str, assets: Path, busy_port: int, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MINDSET_HOME", str(home))
    args = expand(argv, assets, tmp_path, busy_port)
    before = snapshot(assets, tmp_path)
    try:
        status: object = run(args)
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    captured = capsys.readouterr()
    assert_one_line_error(status, captured.err, captured.out, expect)
    assert_unchanged(before, snapshot(assets, tmp_path))


# --- the same through the real console entry point ---------------------------------------------

SUBPROCESS_CASES: list[tuple[str, list[Any], str]] = [
    ("eval-bin-only", evaluate(model="{a}/bin_only"), "holds only pytorch_model.bin"),
    ("distill-value-dim-text", hp("value_dim=abc"), "value_dim='abc'"),
    ("complete-non-utf8-prompt", ["complete", "--model", "tiny-llama", b"caf\xe9 au lait"],
     "not valid UTF-8"),
    ("logs-db-missing", ["logs", "--db", "{t}/no/dir/log.db"], NO_LOG),
    ("serve-host-256", serve("--host", "256.1.1.1"), "256.1.1.1"),
]


@pytest.mark.parametrize("argv, expect", [(a, e) for _, a, e in SUBPROCESS_CASES],
                         ids=[case_id for case_id, _, _ in SUBPROCESS_CASES])
def test_bad_input_in_a_real_process(argv: list[Any], expect: str, assets: Path,
                                     busy_port: int, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    texts = expand([a for a in argv if isinstance(a, str)], assets, tmp_path, busy_port)
    # Raw bytes go to the child as they are: the way a shell passes a Latin-1 argument.
    args = [os.fsdecode(a) if isinstance(a, bytes) else texts.pop(0) for a in argv]
    before = snapshot(assets, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mindset.cli", *[os.fsencode(a) for a in args]],
        capture_output=True, cwd=REPO_ROOT, timeout=180,
        env={**os.environ, "MINDSET_HOME": str(home)},
    )
    err = result.stderr.decode("utf-8", "replace")
    assert_one_line_error(result.returncode, err, result.stdout.decode("utf-8", "replace"),
                          expect)
    assert_unchanged(before, snapshot(assets, tmp_path))


# --- the same checks below the CLI: what the workbench and a resumed run go through -----------


@pytest.mark.parametrize("settings, message", [
    ({"ce_weight": float("nan")}, "ce_weight=nan must be a finite number"),
    ({"lr": float("inf")}, "lr=inf must be a finite number"),
    ({"value_lr": float("nan")}, "value_lr=nan"),
    ({"temperature": float("-inf")}, "temperature=-inf"),
    ({"steps": "10"}, "steps='10' must be an integer"),
    ({"steps": True}, "steps=True must be an integer"),
    ({"data": "text.txt"}, "data='text.txt' must be a list of strings"),
    ({"teacher": " "}, "teacher is empty"),
    ({"hparams": {"novelty_threshold": float("nan")}, "memory": "associative"},
     "novelty_threshold=nan"),
    ({"hparams": {"value_dim": 1.5}}, r"value_dim=1\.5 must be an integer"),
    ({"hparams": {"init": "magic"}}, "not an initialisation"),
    ({"hparams": {"width": 0}, "memory": "dense"}, "width=0"),
], ids=["ce-nan", "lr-inf", "value-lr-nan", "temperature", "steps-text", "steps-bool",
        "data-str", "teacher-blank", "novelty-nan", "value-dim", "init", "dense-width"])
def test_distill_config_refuses_what_json_or_a_front_end_could_hold(
    settings: dict[str, object], message: str
) -> None:
    from engine.distill.config import DistillConfig
    from engine.errors import InputError

    config = DistillConfig.from_dict({"teacher": "tiny-llama", "layers": "1", **settings})
    with pytest.raises(InputError, match=message):
        config.validate()


def test_preflight_reads_the_teacher_config_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.distill.config import DistillConfig
    from engine.errors import InputError
    from engine.model.memory_layers import budget

    base = {"teacher": "tiny-llama", "layers": "1"}
    DistillConfig.from_dict(base).preflight()  # a sane run passes
    with pytest.raises(InputError, match="unknown layer 4: the teacher has 4 layers"):
        DistillConfig.from_dict({**base, "layers": "4"}).preflight()
    with pytest.raises(InputError, match="exceeds the teacher's context of 1024 tokens"):
        DistillConfig.from_dict({**base, "block_size": 1025}).preflight()
    # Each part fits in 1 MiB of "RAM"; the teacher with its student copy does not.
    monkeypatch.setattr(budget, "memory_limit_bytes", lambda: 1 << 20)
    small = {**base, "batch_size": 1, "block_size": 16,
             "hparams": {"heads": 2, "query_dim": 16, "num_subkeys": 8, "topk": 4}}
    with pytest.raises(InputError, match=r"this run \(teacher and student copy 1\.3 MiB, 1 "
                       r"memory layer\(s\) .*\) needs about .* more than this machine's 1\.0 MiB"):
        DistillConfig.from_dict(small).preflight()
