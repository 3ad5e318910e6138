"""The HTTP layer: routes, the guards every request passes, responses, the OpenAPI document,
uvicorn's connection caps and graceful shutdown. It calls the chat layer, never the reverse."""
