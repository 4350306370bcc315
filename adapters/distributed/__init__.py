"""The same :class:`~adapters.base.ChatModel` served by Ray Serve replicas (``serve --ray``).

Each configured model becomes one Ray Serve application with one deployment,
:class:`~adapters.distributed.replica.ModelReplica`, whose replicas each load the checkpoint
through the registry and run their own engine.  The gateway process holds a
:class:`~adapters.distributed.remote.RemoteChatModel` per model: ``prepare`` is a call to a
replica, ``generate`` a streaming call (``handle.options(stream=True)``), and closing the
iterator cancels the request in its replica.  Everything that crosses is the boundary's plain
data (``adapters/base.py``).

This module and :mod:`adapters.distributed.replicas` import nothing from Ray: without ``--ray``
Ray is never imported (it is an optional extra, ``pip install chatglm-gateway[ray]``).
"""

from adapters.distributed.replicas import ReplicaStatus, Replicated, ScaleOptions

__all__ = ["ReplicaStatus", "Replicated", "ScaleOptions"]
