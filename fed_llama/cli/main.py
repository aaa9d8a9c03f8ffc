"""The ``fed-llama`` command: argument parsing, logging, and one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from fed_llama import __version__
from fed_llama.cli import commands, keys
from fed_llama.errors import FedLlamaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fed-llama",
        description="Federated LoRA/QLoRA fine-tuning of LLaMA models, and the path to the edge.")
    parser.add_argument("--version", action="version", version=f"fed-llama {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="make or inspect site data")
    data_sub = data.add_subparsers(dest="data_command", metavar="SOURCE", required=True)
    icd = data_sub.add_parser("icd10", help="write an ICD-10-CM hospital site's data as JSONL")
    icd.add_argument("--site", help="site name, e.g. cardiology (see --list)")
    icd.add_argument("--out", help="training JSONL file to write")
    icd.add_argument("--heldout", help="also write the held-out JSONL (codes unseen in --out)")
    icd.add_argument("--seed", type=int, default=0, help="seed of the held-out code choice")
    icd.add_argument("--list", action="store_true", help="list the sites and exit")
    icd.set_defaults(func=commands.cmd_data_icd10)

    train = sub.add_parser("train", help="train a LoRA/QLoRA adapter on one site's data")
    train.add_argument("config", nargs="?", help="TOML config (template: client/site.toml); "
                       "omitted: all defaults")
    train.add_argument("--out", required=True, help="adapter folder to write")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.max_steps=50 "
                            "(repeatable)")
    train.add_argument("--metrics", help="also write the metrics as JSON to this file")
    train.add_argument("--force", action="store_true", help="replace an existing --out folder")
    train.set_defaults(func=commands.cmd_train)

    ev = sub.add_parser("eval", help="perplexity of a backbone, or backbone + adapter, on data")
    ev.add_argument("--data", required=True,
                    help="JSONL file, or icd10:<site> for that site's held-out questions")
    ev.add_argument("--adapter", help="adapter folder (from fed-llama train)")
    ev.add_argument("--backbone", help="backbone (default: the adapter's, else smollm2-135m)")
    ev.add_argument("--max-records", type=int, default=0, help="seeded sample size (0: all)")
    ev.add_argument("--max-length", type=int, default=256, help="tokens per record")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--skip-bad-lines", action="store_true", help="skip malformed records")
    ev.add_argument("--questions", type=int, default=64,
                    help="also answer up to this many questions per task greedily and score "
                         "them (exact/category/chapter match for codes, token F1); 0: off")
    ev.add_argument("--tasks", help="only these tasks, comma-separated (ICD-10: desc2code, "
                    "code2desc, includes, excludes; other data: answer)")
    ev.add_argument("--max-new-tokens", type=int, default=32, help="answer length bound")
    ev.add_argument("--json", help="also write the result as JSON to this file")
    ev.set_defaults(func=commands.cmd_eval)

    gen = sub.add_parser("generate", help="chat with a backbone (+ adapter), streaming output")
    gen.add_argument("prompt", help="the user's message")
    gen.add_argument("--adapter", help="adapter folder (from fed-llama train)")
    gen.add_argument("--backbone", help="backbone (default: the adapter's, else smollm2-135m)")
    gen.add_argument("--system", help="system message (default: the one the adapter was "
                     "trained with, else the chat template's; '' for an empty one)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--onnx", help="an exported folder (fed-llama export): run it with "
                     "onnxruntime alone, without PyTorch")
    gen.add_argument("--lora", help="with --onnx: a runtime adapter of that export (name in "
                     "its adapters/ folder, or an .onnx_adapter file)")
    gen.set_defaults(func=commands.cmd_generate)

    exp = sub.add_parser("export", help="merge an adapter, build ONNX (fp32/int8/int4) with a "
                         "KV cache, verify it against PyTorch")
    exp.add_argument("--adapter", required=True, help="adapter folder (site or federated round)")
    exp.add_argument("--out", required=True, help="export folder to write")
    exp.add_argument("--profile", help="export profile TOML (edge_export/profiles/); omitted: "
                     "the defaults")
    exp.add_argument("--quant", choices=["fp32", "int8", "int4"],
                     help="weight precision (overrides the profile's quant)")
    exp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a profile value, e.g. --set verify.records=16")
    exp.add_argument("--backbone", help="backbone (default: the adapter's)")
    exp.add_argument("--force", action="store_true", help="replace an existing --out folder")
    exp.set_defaults(func=commands.cmd_export)

    exa = sub.add_parser("export-adapter", help="add an adapter to an export made with "
                         "runtime_adapters, as a file switched in at run time (no re-export)")
    exa.add_argument("--adapter", required=True, help="adapter folder (same method and shape "
                     "as the export's: LoRA rank and targets; V1/Excitor layers and prompts)")
    exa.add_argument("--onnx", required=True, help="the export folder")
    exa.add_argument("--name", help="name to choose it by (default: the adapter folder's name)")
    exa.set_defaults(func=commands.cmd_export_adapter)

    sim = sub.add_parser("simulate", help="run a federation scenario on Flower's Simulation "
                         "Engine")
    sim.add_argument("scenario", help="scenario TOML, e.g. simulations/hospitals-3.toml")
    sim.add_argument("--out", help="run folder (default: runs/<scenario name>)")
    sim.add_argument("--resume", action="store_true",
                     help="continue the run in --out after its last complete round (or start "
                          "it if --out is empty)")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario value, e.g. --set federation.rounds=2")
    sim.set_defaults(func=commands.cmd_simulate)

    aud = sub.add_parser("audit", help="check a federation run's folder: every round once, "
                         "checkpoints intact, the round seals signed and chained")
    aud.add_argument("run", help="the run folder (fed-llama simulate's --out, or the "
                     "ServerApp's)")
    aud.add_argument("--keys", help="the aggregator's key folder (fed-llama keys; default: "
                     "RUN/keys): server.pub.json checks the seals, server.key also compares "
                     "encrypted checkpoints")
    aud.add_argument("--passphrase-env", default="", metavar="VAR",
                     help="the variable holding server.key's passphrase, if it has one")
    aud.set_defaults(func=commands.cmd_audit)

    bb = sub.add_parser("backbone", help="prepare or inspect a backbone")
    bb_sub = bb.add_subparsers(dest="backbone_command", metavar="ACTION", required=True)
    info = bb_sub.add_parser("info", help="resolve (and convert once) a backbone; print its id")
    info.add_argument("name", nargs="?", default="smollm2-135m")
    info.set_defaults(func=commands.cmd_backbone_info)

    keys.add_parser(sub)
    return parser


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    flwr_log = logging.getLogger("flwr")  # Flower prints through its own handler
    flwr_log.propagate = False
    flwr_log.setLevel(logging.WARNING if quiet else logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # "generated new fontManager"
    # torch 2.13 warns about its own code when its first import meets typing_extensions'
    # deprecation marker (whichever command imports torch first): that one notice, by its text
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # transformers reads these when (and if) a command imports it: the edge runtime never does
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args))
    except FedLlamaError as exc:
        print(f"fed-llama: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fed-llama: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
