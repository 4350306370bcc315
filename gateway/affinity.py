"""The conversation's routing key: the client's own name for a conversation, if it gives one.

With ``--ray`` each model runs in several replicas, and a conversation's later turns are fastest
on the replica that holds its prefix cache.  The router (``adapters/distributed/router.py``)
recognises a continued conversation by its leading token ids; a client that names its
conversations routes them explicitly, by the first of:

1. the ``X-Session-Id`` header (any route that generates, ChatGLM's ``POST /`` included);
2. ``prompt_cache_key``, OpenAI's hint for exactly this (requests that share one share a cache);
3. ``user``, which OpenAI used for it before ``prompt_cache_key`` existed.

(``safety_identifier``, the other half of what ``user`` was, names an end user for abuse
detection, not a cache: it stays ignored.)

The key crosses to the model side as a digest (:attr:`adapters.base.Prompt.affinity`): a fixed
size whatever the client sends, and no user name in the cluster's logs.  A header that is not
1-128 visible ASCII characters (no spaces, no controls) is ignored, as if it had not been sent,
and the request is served as usual: the header is only a routing hint, a proxy may forward one
it did not write, and nothing about the answer depends on it.  Body fields are the client's own
and are taken as sent.  A single-process server ignores the key.
"""

from __future__ import annotations

import hashlib
import logging
import re

from starlette.datastructures import Headers

logger = logging.getLogger(__name__)

HEADER = "X-Session-Id"
#: 1-128 visible ASCII characters: UUIDs, tokens, base64 and the like
VALID = re.compile(r"[\x21-\x7e]{1,128}")


def affinity(headers: Headers, prompt_cache_key: str | None = None,
             user: str | None = None) -> str:
    """The routing key of a request (``""``: none given; the router then follows token ids)."""
    name = headers.get(HEADER)
    if name is not None and not VALID.fullmatch(name):
        logger.debug("ignoring an %s header that is not 1-128 visible ASCII characters", HEADER)
        name = None
    name = name or prompt_cache_key or user
    if not name:
        return ""
    # The same name routes together whichever way it was sent.
    # surrogatepass: a JSON string may hold a lone surrogate ("\ud800"), still one name
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=12)
    return digest.hexdigest()
