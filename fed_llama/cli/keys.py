"""``fed-llama keys``: make and enroll the keys that sign and encrypt updates."""

from __future__ import annotations

import argparse
from pathlib import Path

# the crypto modules are imported by the commands that use them: `fed-llama generate --onnx`
# on an edge device must not need `cryptography`


def add_parser(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="make and enroll the keys that sign and encrypt updates")
    ks = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    srv = ks.add_parser("init-server", help="the aggregator's HPKE and signing keys, and an "
                        "empty trust store")
    srv.add_argument("--dir", required=True, help="key folder (server.key, server.pub.json, "
                     "trust.json)")
    srv.add_argument("--kem", choices=["x25519", "mlkem768-x25519"], default="x25519",
                     help="HPKE KEM: X25519, or hybrid post-quantum ML-KEM-768 + X25519")
    srv.add_argument("--passphrase-env", default="", metavar="VAR",
                     help="encrypt the private key with the passphrase in this variable")
    srv.set_defaults(func=cmd_init_server)
    site = ks.add_parser("init-site", help="a site's signing key")
    site.add_argument("site", help="the site's name, as the scenario names it (e.g. cardiology)")
    site.add_argument("--dir", required=True, help="key folder (writes sites/<site>.key and "
                      "sites/<site>.pub.json)")
    site.add_argument("--passphrase-env", default="", metavar="VAR",
                      help="encrypt the private key with the passphrase in this variable")
    site.set_defaults(func=cmd_init_site)
    enroll = ks.add_parser("enroll", help="add sites' public keys to the aggregator's trust "
                           "store")
    enroll.add_argument("public", nargs="+", type=Path, help="sites/<site>.pub.json files")
    enroll.add_argument("--dir", required=True, help="the aggregator's key folder")
    enroll.add_argument("--replace", action="store_true",
                        help="replace a site's key that is already enrolled")
    enroll.set_defaults(func=cmd_enroll)
    tls = ks.add_parser("init-tls", help="a CA and the SuperLink's TLS certificate (Deployment "
                        "Engine)")
    tls.add_argument("--dir", required=True, help="key folder (writes tls/ca.crt, tls/ca.key, "
                     "tls/superlink.crt, tls/superlink.key)")
    tls.add_argument("--host", action="append", default=[], metavar="NAME",
                     help="a DNS name or IP address the SuperNodes reach the SuperLink by "
                     "(repeat; localhost and 127.0.0.1 are always included)")
    tls.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    tls.set_defaults(func=cmd_init_tls)
    node = ks.add_parser("init-node", help="a site's SuperNode authentication key (Deployment "
                         "Engine)")
    node.add_argument("site", help="the site's name (e.g. cardiology)")
    node.add_argument("--dir", required=True, help="key folder (writes nodes/<site>.key and "
                      "nodes/<site>.pub)")
    node.set_defaults(func=cmd_init_node)
    dec = ks.add_parser("decrypt-checkpoint", help="a plain copy of a round checkpoint "
                        "encrypted at rest (security.encrypt_checkpoints)")
    dec.add_argument("checkpoint", type=Path, help="the round folder, e.g. "
                     "runs/x/rounds/round-003")
    dec.add_argument("--dir", required=True, help="the aggregator's key folder (server.key)")
    dec.add_argument("--out", required=True, type=Path, help="folder for the plain peft "
                     "adapter")
    dec.add_argument("--passphrase-env", default="", metavar="VAR",
                     help="the variable holding server.key's passphrase, if it has one")
    dec.add_argument("--force", action="store_true", help="replace --out if it exists")
    dec.set_defaults(func=cmd_decrypt_checkpoint)
    show = ks.add_parser("list", help="the aggregator's key and the enrolled sites")
    show.add_argument("--dir", required=True)
    show.set_defaults(func=cmd_list)


def cmd_init_server(args: argparse.Namespace) -> int:
    from fed_llama.crypto.keyring import KeyFolder, passphrase_from_env

    folder = KeyFolder(Path(args.dir))
    key = folder.init_server(args.kem, passphrase_from_env(args.passphrase_env))
    print(f"aggregator key {key.public().fingerprint} ({args.kem}) in {folder.server_key}; "
          f"give every site {folder.server_public}")
    return 0


def cmd_init_site(args: argparse.Namespace) -> int:
    from fed_llama.crypto.keyring import KeyFolder, passphrase_from_env

    folder = KeyFolder(Path(args.dir))
    key = folder.init_site(args.site, passphrase_from_env(args.passphrase_env))
    print(f"site {key.site} key {key.public().fingerprint} in {folder.site_key(key.site)}; "
          f"give the aggregator {folder.site_public(key.site)}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    from fed_llama.crypto.keyring import KeyFolder

    folder = KeyFolder(Path(args.dir))
    for public in args.public:
        site = folder.enroll(public, replace=args.replace)
        print(f"enrolled {site} in {folder.trust}")
    return 0


def cmd_init_tls(args: argparse.Namespace) -> int:
    from fed_llama.crypto.transport import init_tls

    files = init_tls(Path(args.dir), args.host, days=args.days)
    print(f"CA {files.ca_cert} and SuperLink certificate {files.cert}; start the SuperLink with "
          f"--ssl-ca-certfile {files.ca_cert} --ssl-certfile {files.cert} --ssl-keyfile "
          f"{files.key}, give every site {files.ca_cert} (flower-supernode "
          f"--root-certificates), and move {files.ca_key} offline")
    return 0


def cmd_init_node(args: argparse.Namespace) -> int:
    from fed_llama.crypto.transport import init_node

    files = init_node(Path(args.dir), args.site)
    print(f"SuperNode key {files.node_key(args.site)}: start flower-supernode with "
          f"--auth-supernode-private-key {files.node_key(args.site)}; the aggregator registers "
          f"{files.node_public(args.site)} with flwr supernode register")
    return 0


def cmd_decrypt_checkpoint(args: argparse.Namespace) -> int:
    from fed_llama.adapter.store import (
        SEALED_WEIGHTS,
        check_output_dir,
        read_manifest,
        write_adapter_files,
    )
    from fed_llama.crypto.at_rest import decrypt_at_rest
    from fed_llama.crypto.keyring import KeyFolder, passphrase_from_env
    from fed_llama.crypto.keys import ServerKey
    from fed_llama.errors import AdapterError

    check_output_dir(args.out, args.force)
    manifest = read_manifest(args.checkpoint, sealed=True)
    sealed = manifest.get("encrypted_at_rest")
    if not (args.checkpoint / SEALED_WEIGHTS).is_file() or not isinstance(sealed, dict):
        raise AdapterError(f"{args.checkpoint} is not encrypted at rest: use it as it is")
    key = ServerKey.load(KeyFolder(Path(args.dir)).server_key,
                         passphrase_from_env(args.passphrase_env))
    data = decrypt_at_rest(key, (args.checkpoint / SEALED_WEIGHTS).read_bytes(),
                           str(sealed.get("label")))
    plain = {k: v for k, v in manifest.items() if k not in ("files", "format_version",
                                                            "encrypted_at_rest")}
    plain["decrypted_from"] = str(args.checkpoint)
    write_adapter_files({"adapter_config.json": (args.checkpoint / "adapter_config.json")
                         .read_bytes(), "adapter_model.safetensors": data}, args.out, plain,
                        force=args.force)
    print(f"wrote the plain adapter of {args.checkpoint} to {args.out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from fed_llama.crypto.keyring import KeyFolder
    from fed_llama.crypto.keys import ServerPublicKey, TrustStore

    folder = KeyFolder(Path(args.dir))
    server = ServerPublicKey.load(folder.server_public)
    print(f"aggregator {server.fingerprint} ({server.kem})")
    for name, key in sorted(TrustStore.load(folder.trust).sites.items()):
        print(f"site {name:20s} {key.fingerprint}")
    return 0
