"""``GET /metrics``: Prometheus text exposition of this app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.metrics import GatewayMetrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
@router.head("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    gateway_metrics: GatewayMetrics = request.app.state.metrics
    return Response(gateway_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
