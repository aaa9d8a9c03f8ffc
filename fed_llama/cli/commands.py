"""What each ``fed-llama`` subcommand does (argument parsing is in :mod:`fed_llama.cli.main`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from fed_llama.errors import ConfigError

T = TypeVar("T")


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        from fed_llama.common.files import write_text_atomic

        write_text_atomic(Path(path), json.dumps(payload, indent=2, default=str))


def cmd_data_icd10(args: argparse.Namespace) -> int:
    from fed_llama.data import icd10
    from fed_llama.data.records import write_jsonl

    if args.list:
        for name, (chapter, what) in icd10.SITES.items():
            print(f"{name:20s} chapter {chapter:>2s}  {what}")
        return 0
    if not args.site or not args.out:
        raise ConfigError("fed-llama data icd10 needs --site and --out (or --list to see sites)")
    split = icd10.site_split(args.site, seed=args.seed)
    n = write_jsonl(Path(args.out), split.train)
    print(f"{args.site}: wrote {n} training records ({split.num_codes - split.num_heldout_codes} "
          f"codes) to {args.out}")
    if args.heldout:
        m = write_jsonl(Path(args.heldout), split.heldout)
        print(f"{args.site}: wrote {m} held-out records ({split.num_heldout_codes} codes, none "
              f"seen in training) to {args.heldout}")
    return 0


def _config(cls: type[T], path: str | None, overrides: list[str]) -> T:
    """``cls`` from a TOML file with ``--set`` overrides, or from the overrides alone."""
    from fed_llama.config.loader import apply_overrides, build_config, load_config

    if path:
        return load_config(cls, Path(path), overrides)
    return build_config(cls, apply_overrides({}, overrides), source="--set options")


def cmd_train(args: argparse.Namespace) -> int:
    from fed_llama.config.train import TrainConfig
    from fed_llama.training.job import run_training

    cfg = _config(TrainConfig, args.config, args.set)
    metrics = run_training(cfg, Path(args.out), force=args.force, progress=not args.quiet)
    _write_json(args.metrics, metrics)
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    print(f"held-out perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
          f"({metrics['perplexity_reduction']:.1%} lower) after {metrics['train']['steps']} "
          f"steps in {metrics['train']['seconds']:.0f} s "
          f"({metrics['train']['tokens_per_second']:.0f} tokens/s, peak RSS "
          f"{metrics['peak_rss_mb']:.0f} MiB); adapter in {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fed_llama.config.train import DataConfig
    from fed_llama.data.records import read_jsonl, with_system
    from fed_llama.data.source import load_examples, sample
    from fed_llama.data.tokenize import encode_all
    from fed_llama.inference.model import load_model
    from fed_llama.training.loss import heldout_loss

    loaded = load_model(args.backbone, Path(args.adapter) if args.adapter else None)
    tok = loaded.backbone.tokenizer
    if args.data.startswith("icd10:"):
        examples = load_examples(DataConfig(source=args.data, max_heldout_records=0),
                                 seed=args.seed).heldout
    else:
        examples = read_jsonl(Path(args.data), skip_bad=args.skip_bad_lines).examples
    examples = with_system(sample(examples, args.max_records, args.seed), loaded.system_prompt)
    items, dropped = encode_all(tok, examples, args.max_length)
    if not items:
        raise ConfigError(f"--data {args.data!r}: no record fits in --max-length "
                          f"{args.max_length}: raise it")
    result = heldout_loss(loaded.model, items, args.batch_size, tok.pad_token_id)
    payload = {"backbone": loaded.backbone.describe(), "adapter": args.adapter,
               "data": args.data, "dropped_too_long": dropped, **result.as_dict()}
    what = f"adapter {args.adapter}" if args.adapter else f"base {loaded.backbone.source.id}"
    print(f"{what} on {args.data}: loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
          f"({result.examples} records, {result.tokens} answer tokens)")
    if args.questions:
        from fed_llama.evaluation.tasks import evaluate_tasks

        tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else None
        report = evaluate_tasks(loaded.model, tok, examples, max_questions=args.questions,
                                seed=args.seed, batch_size=args.batch_size,
                                max_new_tokens=args.max_new_tokens, tasks=tasks)
        if not report.metrics:
            raise ConfigError(f"--tasks {args.tasks!r}: no question of those tasks in "
                              f"{args.data!r}")
        payload["tasks"] = report.metrics
        payload["samples"] = report.samples
        for task, m in sorted(report.metrics.items()):
            scores = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n")
            print(f"  {task} ({int(m['n'])} questions, greedy): {scores}")
    _write_json(args.json, payload)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fed_llama.inference.generate import check_sampling, stream_chat

    check_sampling(args.temperature, args.top_p, args.max_new_tokens)  # before loading
    if args.onnx or args.lora:
        return _generate_onnx(args)
    from fed_llama.inference.model import load_model

    loaded = load_model(args.backbone, Path(args.adapter) if args.adapter else None)
    return _print_stream(stream_chat(
        loaded.model, loaded.backbone.tokenizer, _chat_messages(args, loaded.system_prompt),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed))


def _chat_messages(args: argparse.Namespace, trained: str | None) -> list[dict[str, str]]:
    """The prompt as messages: ``--system``, else the system message the model was trained
    with (``trained``; None: the chat template's default)."""
    system = args.system if args.system is not None else trained
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": args.prompt})
    return messages


def _print_stream(pieces: Iterable[str]) -> int:
    """Write generated text to stdout as it arrives, then a newline."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generate_onnx(args: argparse.Namespace) -> int:
    """The edge path: onnxruntime, tokenizers and numpy; torch is never imported."""
    from fed_llama.export.build import EDGE_RUNTIME, require

    require(EDGE_RUNTIME, "fed-llama generate --onnx")
    from fed_llama.export.folder import exported_system_prompt
    from fed_llama.export.runtime import OnnxCausalLM

    if args.lora and not args.onnx:
        raise ConfigError("--lora chooses a runtime adapter of an ONNX export: add --onnx DIR")
    if args.adapter or args.backbone:
        raise ConfigError("--onnx runs an exported model, which already holds its adapter and "
                          "backbone: drop --adapter/--backbone, or drop --onnx")
    folder = Path(args.onnx)
    if not folder.is_dir():
        raise ConfigError(f"--onnx {args.onnx!r} is not a folder: give the folder written by "
                          "`fed-llama export`")
    lm = OnnxCausalLM(folder, adapter=args.lora)
    messages = _chat_messages(args, exported_system_prompt(folder))
    return _print_stream(lm.chat(messages, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p,
                                 seed=args.seed))


def cmd_export(args: argparse.Namespace) -> int:
    from fed_llama.config.export import ExportConfig
    from fed_llama.export.build import check_export_dependencies

    overrides = list(args.set) + ([f"quant='{args.quant}'"] if args.quant else [])
    cfg = _config(ExportConfig, args.profile, overrides)
    check_export_dependencies()  # before importing torch (a missing one: a line, no traceback)
    from fed_llama.export.folder import summary_line
    from fed_llama.export.pipeline import export_adapter

    out = Path(args.out)
    manifest = export_adapter(Path(args.adapter), out, cfg, backbone=args.backbone,
                              force=args.force)
    print(summary_line(manifest, out))
    return 0


def cmd_export_adapter(args: argparse.Namespace) -> int:
    from fed_llama.export.build import ADAPTER_FILES, require

    require(ADAPTER_FILES, "fed-llama export-adapter")
    from fed_llama.export.switchable import add_adapter

    out = add_adapter(Path(args.adapter), Path(args.onnx), args.name)
    print(f"runtime adapter written to {out} ({out.stat().st_size / 1e6:.1f} MB); use it with "
          f"fed-llama generate --onnx {args.onnx} --lora {out.name[:-len('.onnx_adapter')]}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from fed_llama.launch.simulate import simulate
    from fed_llama.server.checkpoint import evaluated, pooled_task_scores

    scenario = Path(args.scenario)
    out = Path(args.out) if args.out else Path("runs") / scenario.stem
    store = simulate(scenario, out, resume=args.resume, overrides=args.set)
    rows = store.history()
    scored = evaluated(rows)  # federation.evaluate_every may skip some rounds
    if scored:
        first, last = scored[0], scored[-1]
        held = (f"{first['pooled-perplexity']:.2f} after round {first['round']} -> "
                if len(scored) > 1 else "")
        print(f"{len(rows)} round(s) in {out}: training loss "
              f"{rows[0].get('train-loss', math.nan):.3f} in round {rows[0]['round']} -> "
              f"{rows[-1].get('train-loss', math.nan):.3f} in round {rows[-1]['round']}; "
              f"pooled held-out perplexity {held}{last['pooled-perplexity']:.2f} after round "
              f"{last['round']}; history.csv, perplexity.png, bytes.png, "
              f"rounds/round-{rows[-1]['round']:03d}/")
        tasks = pooled_task_scores(last)
        if tasks:
            print(f"pooled task scores after round {last['round']} (greedy answers to held-out "
                  f"questions): {tasks}; tasks.png")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fed_llama.adapter.store import SEALED_WEIGHTS
    from fed_llama.crypto.keyring import KeyFolder, passphrase_from_env
    from fed_llama.crypto.keys import ServerKey, ServerPublicKey
    from fed_llama.server.audit import audit_run

    out = Path(args.run)
    if not (out / "history.json").is_file() and not (out / "seals").is_dir():
        raise ConfigError(f"{out} is not a federation run's folder (no history.json, no "
                          "seals/): give the --out of fed-llama simulate or the ServerApp's")
    folder = KeyFolder(Path(args.keys) if args.keys else out / "keys")
    public = decrypt = None
    if folder.server_public.is_file():
        public = ServerPublicKey.load(folder.server_public)
    elif args.keys:
        raise ConfigError(f"--keys {args.keys}: no server.pub.json there; give the folder "
                          "`fed-llama keys server` made")
    if public is not None and folder.server_key.is_file() and \
            any(out.glob(f"rounds/round-*/{SEALED_WEIGHTS}")):
        from fed_llama.crypto.at_rest import checkpoint_ciphers

        key = ServerKey.load(folder.server_key, passphrase_from_env(args.passphrase_env))
        decrypt = checkpoint_ciphers(key)[1]
    if public is not None:
        import hashlib

        where = folder.server_public.resolve()
        print(f"key      {where} (fingerprint "
              f"{hashlib.sha256(where.read_bytes()).hexdigest()[:16]})")
        if where.is_relative_to(out.resolve()):
            print("warning  the key is inside the run folder: whoever can rewrite the folder "
                  "can re-sign it; give --keys the aggregator's key from a copy you trust")
    audit = audit_run(out, public, decrypt)
    for line in audit.checked:
        print(f"ok       {line}")
    for line in audit.problems:
        print(f"PROBLEM  {line}")
    rounds = len(audit.completed)
    print(f"{out}: {'PASS' if audit.ok else 'FAIL'}: {rounds} completed round(s), "
          f"{audit.seals} seal(s) verified, {len(audit.problems)} problem(s)")
    return 0 if audit.ok else 1


def cmd_backbone_info(args: argparse.Namespace) -> int:
    from fed_llama.backbone.load import resolve_backbone

    src = resolve_backbone(args.name)
    config = json.loads((src.model_dir / "config.json").read_text())
    print(json.dumps({"id": src.id, "sha256": src.sha256, "model_dir": str(src.model_dir),
                      "layers": config.get("num_hidden_layers"),
                      "hidden_size": config.get("hidden_size"),
                      "vocab_size": config.get("vocab_size")}, indent=2))
    return 0
