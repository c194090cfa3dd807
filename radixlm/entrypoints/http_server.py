"""HTTP server: the FastAPI app and the launch sequence.

`create_app(tm)` wires the guards (entrypoints/http_guards.py: body size 413, API key, CORS, error
shapes), SGLang's native routes (entrypoints/native_routes.py) and the OpenAI ones
(entrypoints/openai/) around one TokenizerManager. `launch_server` starts the runtime processes,
then uvicorn. Request path: [CORS] -> API key -> body size limit -> route -> TokenizerManager.build
(validation, 400 on error) -> submit -> wait/stream -> JSON/SSE.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from radixlm import __version__
from radixlm.managers.scheduler_process import process_start_time, startup_timeline
from radixlm.managers.tokenizer_manager import TokenizerManager
from radixlm.server_args import ServerArgs

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5  # open streams get this long after Ctrl-C / SIGTERM, then the server exits


def create_app(tm: TokenizerManager) -> FastAPI:
    # the HTTP modules load here: `launch_server` builds the app while the scheduler loads the model
    from fastapi import FastAPI

    from radixlm.entrypoints.http_guards import install_guards
    from radixlm.entrypoints.native_routes import register_native_routes
    from radixlm.entrypoints.openai.routes import register_openai_routes

    app = FastAPI(title="radixlm", version=__version__)
    app.state.tm = tm
    install_guards(app, tm.args)
    app.router.on_startup.append(tm.connect)  # the sockets belong to the server's event loop
    register_native_routes(app)
    register_openai_routes(app, tm)
    from radixlm.entrypoints.lora_routes import register_lora_routes

    register_lora_routes(app)
    return app


def launch_server(args: ServerArgs) -> None:
    """One replica's HTTP server (`launch_server.main` sends --dp-size N > 1 to the dp launcher)."""
    if args.dp_size > 1:
        raise ValueError("dp_size: launch_server() serves one replica; use radixlm.launch_server.main or "
                         "radixlm.entrypoints.dp_launcher for --dp-size > 1")

    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    tm = TokenizerManager(args)
    tm.start(start_method="fork" if tm.fork_is_safe() else "spawn")
    try:
        app = create_app(tm)  # while the scheduler loads the model
    except BaseException:
        tm.shutdown()
        raise
    tm.startup_marks["main.app"] = time.time()
    import uvicorn

    tm.wait_ready()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_keep_alive=5, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    app.state.uvicorn_server = server  # /health answers 503 once it is shutting down

    @app.on_event("startup")
    async def _ready():
        tm.startup_marks["main.serving"] = time.time()
        logger.info("start-up timeline (s since launch): %s", startup_timeline(tm.startup_marks, process_start_time()))
        logger.info("The server is fired up and ready to roll! http://%s:%d (model %s, %d KV tokens)",
                    args.host, args.port, tm.served_model_name, tm.server_info.get("max_total_num_tokens", 0))

    try:
        server.run()
    finally:
        tm.shutdown()
