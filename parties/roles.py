"""The three roles of a session, each run in its own process over ZeroMQ.

Session, in order (every arrow is framed messages on one channel; nothing is pickled):
  1. handshake    user -> owner   hello: model, prompt length, token budget, fixed-point scales, session id
                  owner -> user   welcome: public architecture and its fingerprint (or an error naming the mismatch)
                  user -> owner   the BFV public context, only with the "bfv" token selection (not offered)
  2.              owner -> helper its seed and the architecture; user -> helper its seed and the plan
  3. preparation  owner -> user: every masked weight W - U (once per session)
  4. offline      helper -> owner, helper -> user: the material for the whole budget
  5. online       owner <-> user: prefill and generation (or one embedding)
  6. report       each role returns its report (timings, traffic, peak memory) as a dict of the JSON
                  the launcher merges (`OwnerReport`, `UserReport`, `HelperReport`, each `.to_dict()`).

One module per role (`parties.owner`, `parties.user`, `parties.helper`), the handshake's messages and
checks in `parties.handshake`, the user's input checks in `parties.user_input`; this module gathers
their public names.
"""

from __future__ import annotations

from parties.handshake import OFFERED_SELECTIONS, SEED_TAG, Plan, check_hello
from parties.handshake import check_plans as _check_plans
from parties.handshake import check_welcome as _check_welcome
from parties.helper import HelperReport, run_helper
from parties.owner import OwnerReport, run_owner
from parties.user import UserReport, run_user
from parties.user_input import UserRequest, check_text, prepare_prompt, prepare_sentence

__all__ = [
    "OFFERED_SELECTIONS",
    "SEED_TAG",
    "HelperReport",
    "OwnerReport",
    "Plan",
    "UserReport",
    "UserRequest",
    "_check_plans",
    "_check_welcome",
    "check_hello",
    "check_text",
    "prepare_prompt",
    "prepare_sentence",
    "run_helper",
    "run_owner",
    "run_user",
]
