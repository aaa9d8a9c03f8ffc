"""The fed-llama command: end to end on the tiny model, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import qa_records

from fed_llama.cli.main import main


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    """The error block (one line, or a header line and one line per config problem)."""
    err = capsys.readouterr().err
    assert rc == 2 and "fed-llama: error: " in err and "Traceback" not in err
    return err[err.index("fed-llama: error: "):]


def test_train_eval_generate_on_a_tiny_model(tiny_backbone: Path, write_jsonl, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(qa_records(24))
    config = tmp_path / "site.toml"
    config.write_text(f'[backbone]\nname = "{tiny_backbone}"\n[data]\nsource = "{data.name}"\n'
                      "[train]\nmax_steps = 4\nwarmup_steps = 1\n")
    out, metrics = tmp_path / "adapter", tmp_path / "m.json"
    assert main(["-q", "train", str(config), "--out", str(out), "--metrics", str(metrics),
                 "--set", "lora.r=4"]) == 0
    m = json.loads(metrics.read_text())
    assert m["train"]["steps"] == 4 and m["trainable_parameters"] == 2 * 4 * (128 + 96 + 96 + 128)
    assert "held-out perplexity" in capsys.readouterr().out

    result = tmp_path / "eval.json"
    assert main(["-q", "eval", "--adapter", str(out), "--data", str(data),
                 "--json", str(result)]) == 0
    evaluated = json.loads(result.read_text())
    assert evaluated["examples"] == 24 and evaluated["backbone"]["id"] == str(tiny_backbone)
    assert "perplexity" in capsys.readouterr().out

    assert main(["-q", "generate", "--adapter", str(out), "What does code I10 describe?",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_refuses_to_overwrite_an_adapter_before_doing_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    line = _one_line_error(capsys, main(["train", "--out", str(out),
                                         "--set", "backbone.name='/nowhere'"]))
    assert "already exists and is not empty" in line and "--force" in line
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("argv, expected", [
    (["train", "--out", "x", "--set", "train.max_steps=0"], "train.max_steps must be at least 1"),
    (["train", "missing.toml", "--out", "x"], "config file 'missing.toml' does not exist"),
    (["train", "--out", "x", "--set", "nokey"], "expected KEY=VALUE"),
    (["eval", "--data", "nope.jsonl", "--backbone", "/nowhere"], "no such file or folder"),
    (["eval", "--data", "nope.jsonl", "--adapter", "/nowhere"], "is not a folder"),
    (["generate", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["data", "icd10", "--site", "cardiology"], "needs --site and --out"),
])
def test_bad_input_is_one_line_naming_the_problem(argv: list[str], expected: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert expected in _one_line_error(capsys, main(argv))


def test_keys_for_a_server_and_a_site(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "keys"
    monkeypatch.setenv("SITE_PASSPHRASE", "correct horse")
    assert main(["keys", "init-server", "--dir", str(folder), "--kem", "mlkem768-x25519"]) == 0
    assert main(["keys", "init-site", "cardiology", "--dir", str(folder),
                 "--passphrase-env", "SITE_PASSPHRASE"]) == 0
    assert main(["keys", "enroll", str(folder / "sites" / "cardiology.pub.json"),
                 "--dir", str(folder)]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "(mlkem768-x25519)" in out and "site cardiology" in out
    assert (folder / "sites" / "cardiology.key").stat().st_mode & 0o777 == 0o600
    # keys are never overwritten, and a missing passphrase variable is named
    assert main(["keys", "init-server", "--dir", str(folder)]) == 2
    monkeypatch.delenv("SITE_PASSPHRASE")
    assert main(["keys", "init-site", "oncology", "--dir", str(folder),
                 "--passphrase-env", "SITE_PASSPHRASE"]) == 2
    err = capsys.readouterr().err
    assert "keys are never overwritten" in err and "'SITE_PASSPHRASE'" in err
