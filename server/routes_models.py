"""GET /v1/models and /v1/models/{id}: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.params import check_model
from server.protocol import ModelCard, ModelList

router = APIRouter(tags=["models"])


def _card(request: Request) -> ModelCard:
    info = request.app.state.backend.info
    return ModelCard(id=info.name, root=info.path, max_model_len=info.max_model_len)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(request)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    check_model(model_id, request.app.state.backend)
    return _card(request)
