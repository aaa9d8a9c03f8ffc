"""The names messages between the aggregator and the sites use: one place for every key.

Flower's Message API carries records by name (``ArrayRecord``, ``MetricRecord``,
``ConfigRecord``) and each record carries values by key. The aggregator (``fed_llama.server``)
and the sites (``fed_llama.client``) must agree on them; both import them from here, and
neither imports the other.
"""

from __future__ import annotations

# Records of a message (Flower's own names for the defaults its strategies use)
ARRAYS = "arrays"
"""ArrayRecord: the global adapter (to a site) or a plain update (from a site, no envelopes)."""
METRICS = "metrics"
"""MetricRecord: the numbers a site reports."""
CONFIG = "config"
"""ConfigRecord: the round's settings, from the aggregator."""
ARRAYS_LAYOUT = "arrays-layout"
"""ConfigRecord: present when the ARRAYS record is packed into one array (its names, dtypes
and shapes: fed_llama.adapter.packed_arrays)."""
ENVELOPE = "envelope"
"""ConfigRecord: a site's update envelope (signed, encrypted: fed_llama.crypto.envelope)."""
CARRIED_EVALUATION = "carried-evaluation"
"""MetricRecord of a training reply: the site's evaluation of the adapter it received
(EVALUATE_FIRST), the same numbers an evaluation reply's METRICS holds, without its times."""
ENVELOPE_BYTES = "bytes"
"""In the ENVELOPE record: the envelope's bytes."""

# Keys of the aggregator's CONFIG record
ROUND = "fed-round"
"""The run's round number (Flower's ``server-round`` restarts at 1 on --resume)."""
FLOWER_ROUND = "server-round"
"""Flower's own round number, the fallback when ROUND is missing."""
RUN_ID = "run-id"
"""The run id envelopes are bound to."""
ROUND_SEAL = "round-seal"
"""The aggregator's signed, hash-chained seal of the adapter it sends (JSON)."""
EVALUATE_FIRST = "evaluate-first"
"""Training config (``federation.carry_evaluation``): the round whose global adapter this
message carries, which the site evaluates before it trains on it (0: none)."""
PROXIMAL_MU = "proximal-mu"
"""FedProx's proximal weight (sent by Flower's FedProx)."""
SETTINGS = "fed-settings"
"""The federation's settings as JSON (fed_llama.config.run_settings), for real sites."""
BACKBONE_SHA256 = "fed-backbone-sha256"
"""The sha256 of the backbone the aggregator runs."""
SITES = "fed-sites"
"""Query: the federation's site names, in order."""
ASK = "ask"
"""Query: what the aggregator asks (SITE_QUERY)."""

# The aggregator's own times of a phase (history keys "train-sent-at", "evaluate-received-at")
SENT_AT = "sent-at"
"""The aggregator's clock when the phase's messages were made (Flower sends them next)."""
RECEIVED_AT = "received-at"
"""The aggregator's clock when Flower handed it the phase's replies."""

# Keys of a site's METRICS record
NUM_EXAMPLES = "num-examples"
"""Examples the site trained on (its aggregation weight, bounded) or evaluated."""
SITE = "site"
"""The site's index among the federation's sites."""
SITE_QUERY = SITE
"""Query reply: the site index a node holds (cyclic participation)."""
TRAIN_LOSS = "train-loss"
HELDOUT_LOSS = "heldout-loss"
HELDOUT_TOKENS = "heldout-tokens"
EVALUATE_SECONDS = "evaluate-seconds"
"""Seconds the site spent evaluating (held-out loss and task questions)."""
CARRIED_EVALUATE_SECONDS = "carried-evaluate-seconds"
"""In a training reply's METRICS: seconds the site spent on the evaluation it carried."""
LOAD_SECONDS = "load-seconds"
"""Seconds the site spent loading the backbone and its data for this message (about 0 where
its process already holds them, as the Simulation Engine's actors do; on the Deployment Engine
each message starts a fresh ClientApp process)."""
STARTED_AT = "started-at"
"""The site's clock (seconds since the epoch) when its handler got the message: with the
aggregator's SENT_AT, how long Flower took to hand it over (on the Deployment Engine, the
SuperNode's poll and a fresh ClientApp process)."""
PROCESS_STARTED_AT = "process-started-at"
"""When the site's process started (Linux; to about a second): before STARTED_AT by the time a
fresh ClientApp process takes to import Flower, install the app and load it."""
DONE_AT = "done-at"
"""The site's clock when its handler finished: with RECEIVED_AT, how long the reply took."""
SITE_TIMINGS = (LOAD_SECONDS, PROCESS_STARTED_AT, STARTED_AT, DONE_AT)
"""What a site reports of each message's timing, kept per phase in the history
(``<site>/train-started-at``, ``<site>/evaluate-load-seconds`` ...)."""
BYTES_UP = "bytes-up"
