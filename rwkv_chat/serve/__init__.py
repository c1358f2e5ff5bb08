"""`rwkv-chat serve`: an OpenAI-compatible HTTP server over one model.

    cache.py      StateCache: states after served token prefixes (LRU, bounded by bytes)
    scheduler.py  Scheduler: one thread; continuous batching (engine forward_batch), chunked
                  prefill, the bounded queue, cancellation
    api.py        the Starlette app: /v1/chat/completions, /v1/completions, /v1/models, /health;
                  request checks and OpenAI-shaped answers and errors
    server.py     build_service(); listen() takes the address before the model loads; HttpServer
                  starts the scheduler and serves with uvicorn (SIGTERM drains)
"""
