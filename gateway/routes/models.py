"""GET /v1/models and GET /v1/models/{id}, from each model's ModelInfo."""

from __future__ import annotations

from fastapi import APIRouter, Request

from adapters.distributed import Replicated
from gateway.catalog import ModelCatalog, ServedModel
from gateway.protocol import ModelCard, ModelList

router = APIRouter()

_SCALARS = (str, int, float, bool)


def card(served: ServedModel) -> ModelCard:
    """OpenAI's model object plus our fields; JSON scalars of ``ModelInfo.extra`` pass through."""
    info = served.model.info
    created = info.extra.get("created")
    extra = {
        k: v for k, v in info.extra.items()
        if isinstance(v, _SCALARS) and k not in ModelCard.model_fields
    }
    return ModelCard.model_validate({
        **extra,
        "id": info.id,
        "created": created if isinstance(created, int) else served.created,
        "owned_by": info.owned_by,
        "family": info.family,
        "context_length": info.context_length,
        "description": info.description,
        "aliases": list(served.aliases),
    })


def _catalog(request: Request) -> ModelCatalog:
    catalog: ModelCatalog = request.app.state.catalog
    return catalog


@router.get("/v1/models")
@router.head("/v1/models", include_in_schema=False)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[card(served) for _, served in _catalog(request)])


# ":path" because model ids may contain a slash ("THUDM/chatglm3-6b").
@router.get("/v1/models/{model_id:path}")
@router.head("/v1/models/{model_id:path}", include_in_schema=False)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """The model's card; a model served by Ray Serve replicas (``--ray``) also lists them:
    ``replicas: [{id, node, pid, running, waiting, kv_cache_bytes}]``."""
    served = _catalog(request).resolve(model_id)
    found = card(served)
    if isinstance(served.model, Replicated):
        found = found.model_copy(update={"replicas": [
            {"id": r.id, "node": r.node, "pid": r.pid, "running": r.running,
             "waiting": r.waiting, "kv_cache_bytes": r.counts.get("kv_cache_bytes", 0)}
            for r in served.model.replicas()]})
    return found
