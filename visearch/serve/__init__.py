"""`visearch serve` / `visearch ui`: a warm search server (FastAPI + uvicorn) with a JSON API and an offline page.

service.py holds the loaded Searchers and the worker pool, app.py the routes, server.py the process (host policy,
token, uvicorn, shutdown); static/ is the page. fastapi is imported only by app.py and server.py.
"""
