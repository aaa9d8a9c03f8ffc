"""A site's side of the update protocol: check the round's seal, send the update in an envelope.

Before training, the site checks that the aggregator signed the global adapter it received
for this round of this run (and, when it saw the previous round, that the seal chains to it).
After training, it encrypts its update to the aggregator and signs it
(:func:`fed_llama.crypto.make_envelope`). Key paths come from the key folder, or from the
node's config (``site-key``, ``server-public``) on a real SuperNode.

:func:`envelope_mod` does both around the ClientApp's training, the site's side of
:class:`fed_llama.server.envelopes.UpdateEnvelopes` (as Flower's ``fixedclipping_mod`` is
the site's side of its DP wrapper): the training itself replies in plain records.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fed_llama import wire
from fed_llama.adapter.state import State, state_digest, state_payload
from fed_llama.client.federation import training_membership
from fed_llama.client.records import round_number, scalars, torch_state
from fed_llama.config.scenario import ScenarioConfig
from fed_llama.config.security import SecurityConfig
from fed_llama.crypto import RoundSeal, make_envelope, verify_round
from fed_llama.crypto.keyring import KeyFolder, passphrase_from_env
from fed_llama.crypto.keys import ServerPublicKey, SiteKey
from fed_llama.crypto.refusal import Refused

log = logging.getLogger(__name__)

_LAST_SEAL: dict[str, tuple[int, str]] = {}
"""run -> (round, digest) of the last seal this process accepted: the chain check."""


@functools.lru_cache(maxsize=8)
def _keys(site_key: Path, server_public: Path, passphrase_env: str
          ) -> tuple[SiteKey, ServerPublicKey]:
    return (SiteKey.load(site_key, passphrase_from_env(passphrase_env)),
            ServerPublicKey.load(server_public))


def site_keys(cfg: SecurityConfig, site: str, node_config: Mapping[str, Any]
              ) -> tuple[SiteKey, ServerPublicKey]:
    """This site's signing key and the aggregator's public key."""
    folder = KeyFolder(Path(cfg.keys))
    key_path = Path(str(node_config.get("site-key") or folder.site_key(site)))
    pub_path = Path(str(node_config.get("server-public") or folder.server_public))
    key, server = _keys(key_path, pub_path, cfg.passphrase_env)
    if key.site != site:
        raise Refused("bad-key", f"{key_path} is the key of site {key.site!r}, but this node "
                      f"serves site {site!r}: point site-key at this site's key")
    return key, server


def check_round(cfg: SecurityConfig, server: ServerPublicKey, config: Mapping[str, Any],
                state: State, server_round: int) -> str:
    """Verify this round's seal over ``state`` (if seals are on); return the run id."""
    run = config.get(wire.RUN_ID)
    if not isinstance(run, str) or not run:
        raise Refused("malformed", "the round's config carries no run id: is the aggregator "
                      "running with [security] envelopes = true?")
    if cfg.seal_rounds:
        text = config.get(wire.ROUND_SEAL)
        if not isinstance(text, str):
            raise Refused("bad-seal", "the aggregator sent no round seal; refusing to train on "
                          "an adapter nobody vouches for")
        seal = RoundSeal.parse(text)
        last = _LAST_SEAL.get(run)
        prev = last[1] if last and last[0] == server_round - 1 else None
        verify_round(seal, server, run=run, server_round=server_round,
                     adapter_sha256=state_digest(state),
                     prev_digest=prev)
        _LAST_SEAL[run] = (server_round, seal.digest)
    return run


def envelope_update(key: SiteKey, server: ServerPublicKey, *, run: str, server_round: int,
                state: State, metrics: dict[str, float]) -> bytes:
    """The update as an envelope: encrypted to the aggregator, signed by this site."""
    return make_envelope(state_payload(state), site_key=key, server=server, run=run,
                         server_round=server_round, metrics=metrics)


Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def envelope_mod(scenario: ScenarioConfig | None) -> Mod:
    """A ClientApp mod: on a training message of a federation with ``security.envelopes``,
    check the round's seal before the site trains, and reply with the update in an
    envelope (``scenario``: the one ``fed-llama simulate`` built the app around; None: from
    the run or the site's config)."""

    def mod(msg: Message, context: Context,
            call_next: Callable[[Message, Context], Message]) -> Message:
        member = training_membership(msg, context, scenario)
        if member is None:
            return call_next(msg, context)
        config = msg.content.config_records[wire.CONFIG]
        sec = member.scenario.security
        if not sec.envelopes:
            return call_next(msg, context)
        key, server = site_keys(sec, member.name, member.key_paths)
        server_round = round_number(config)
        # check the seal before spending any time on training
        run = check_round(sec, server, config,
                          torch_state(msg.content.array_records[wire.ARRAYS]),
                          server_round)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        metrics = scalars(reply.content.metric_records[wire.METRICS])
        sealed = envelope_update(key, server, run=run, server_round=server_round,
                                 state=torch_state(reply.content.array_records[wire.ARRAYS]),
                                 metrics=metrics)
        carried = reply.content.metric_records.get(wire.CARRIED_EVALUATION)
        reply.content = RecordDict({
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: metrics[wire.NUM_EXAMPLES],
                                        wire.SITE: metrics[wire.SITE]}),
            wire.ENVELOPE: ConfigRecord({wire.ENVELOPE_BYTES: sealed})})
        if carried is not None:  # beside the envelope, as an evaluation reply sends it
            reply.content[wire.CARRIED_EVALUATION] = carried
        return reply

    return mod
