"""The review app on Ray Serve: one deployment holding the models, a FastAPI ingress serving the
pages in ``allcore/review/static`` and a small JSON API.

    serve run pipelines.review:build_app output=/data/predictions model=runs/s000/model
    serve deploy infra/serve_review.yaml          (a cluster)
    python jobs/review.py serve --output ... --model ...   (a laptop: loopback, port 8000)

Bound to anything but loopback the app needs a token (``token=``): every API call must carry
``Authorization: Bearer <token>``; opening ``/?token=<token>`` once stores it in a cookie.
"""

# No `from __future__ import annotations`: FastAPI must see the real Request/UploadFile types
# on the methods Serve rewraps, not strings it can no longer resolve.
import base64
import datetime as dt
import hmac
import os
import posixpath
import urllib.parse
from importlib import resources

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve

from allcore.imaging.files import decode_rgb, read_bytes
from allcore.imaging.overlay import png_bytes, render
from allcore.review.analysis import MAX_UPLOAD_BYTES, FieldAnalyser, UploadError
from allcore.review.corrections import Correction, CorrectionError, CorrectionStore
from allcore.review.geojson import feature_collections
from allcore.review.queue import ReviewQueue, box_of, queue_item
from allcore.scoring.rows import FIELD
from allcore.scoring.tiles import slide_output, slide_output_names

TOKEN_COOKIE = "allcore_review_token"
CONTEXT_SIDE = 256  # side of the picture of a queued cell with its neighbourhood
SLIDE_FILES = {"overview.png": (".png", "image/png"),  # a slide's files as the app serves them
               "cells.geojson": (".geojson", "application/geo+json")}
STATIC = resources.files("allcore.review") / "static"

app = FastAPI(title="allcore review")
app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")


class Decision(BaseModel):
    correction_id: str
    cell_id: str
    label: str
    reviewer: str


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class ReviewApp:
    def __init__(self, output: str, model: str, cell_model: str | None = None,
                 token: str | None = None):
        self.analyser = FieldAnalyser(model, cell_model)
        self.queue = ReviewQueue(output)
        self.corrections = CorrectionStore(output)
        self.token = token

    def _authorise(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ") if header.startswith("Bearer ") else \
            request.cookies.get(TOKEN_COOKIE) or request.query_params.get("token", "")
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, "this review app needs its token: open /?token=<token> "
                                     "once, or send 'Authorization: Bearer <token>'")

    @app.get("/")
    def index(self, request: Request) -> Response:
        self._authorise(request)
        page = Response((STATIC / "index.html").read_bytes(), media_type="text/html")
        if self.token is not None:
            page.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        return page

    @app.post("/api/analyse")
    async def analyse(self, request: Request, file: UploadFile = File(...)) -> JSONResponse:
        self._authorise(request)
        data = await file.read(MAX_UPLOAD_BYTES + 1)  # one byte over is enough to refuse
        try:
            result = self.analyser.analyse(file.filename or "upload", data)
        except UploadError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        keep = ("cell_id", "pred_label", "confidence", "blast_probability", "call", "needs_review",
                "review_reason", "ood_score", "box_x0", "box_y0", "box_x1", "box_y1", "cell_count")
        return JSONResponse({
            "field": {k: result.field[k] for k in keep},
            "cells": [{k: cell[k] for k in keep} for cell in result.cells],
            "boxes_png": _data_uri(result.boxes_png),
            "field_saliency_png": _data_uri(result.field_saliency_png),
            "cell_saliency_pngs": [_data_uri(p) for p in result.cell_saliency_pngs]})

    @app.get("/api/specimens")
    def specimens(self, request: Request) -> list[dict]:
        self._authorise(request)
        return self.queue.specimens(set(self.corrections.newest()["cell_id"]))

    @app.get("/api/queue")
    def pending(self, request: Request, specimen: str) -> list[dict]:
        self._authorise(request)
        rows = self.queue.pending(set(self.corrections.newest()["cell_id"]), specimen)
        return [queue_item(row) for row in rows.to_dict("records")]

    @app.get("/api/picture")
    def picture(self, request: Request, cell_id: str) -> Response:
        """The row's box drawn on its field, around the box (the whole field for a field row)."""
        self._authorise(request)
        try:
            row = self.queue.row(cell_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc)) from None
        field = decode_rgb(read_bytes(row["source_uri"]))
        x0, y0, x1, y1 = box_of(row)
        margin = max(x1 - x0, y1 - y0)
        window = (max(0, x0 - margin), max(0, y0 - margin),
                  min(field.width, x1 + margin), min(field.height, y1 + margin))
        view = field.crop(window)
        shifted = (x0 - window[0], y0 - window[1], x1 - window[0], y1 - window[1])
        boxes = [] if row["row_kind"] == FIELD else [shifted]
        return Response(png_bytes(render(view, boxes, side=CONTEXT_SIDE)), media_type="image/png")

    @app.post("/api/corrections")
    def correct(self, request: Request, decision: Decision) -> dict:
        self._authorise(request)
        try:
            correction = Correction(decision.correction_id, self.queue.row(decision.cell_id),
                                    decision.label, decision.reviewer, dt.datetime.now(dt.timezone.utc))
            recorded = self.corrections.append(correction)
        except (CorrectionError, KeyError) as exc:
            raise HTTPException(422, str(exc).strip("'\"")) from None
        return {"recorded": recorded, "correction_id": decision.correction_id}

    @app.get("/api/slides")
    def slides(self, request: Request) -> list[dict]:
        """Every slide scored into the output: its overview (cells coloured by call) and GeoJSON."""
        self._authorise(request)

        def url(name: str, part: str) -> str:
            return f"/api/slides/{urllib.parse.quote(name, safe='')}/{part}"
        return [{"name": name, "overview": url(name, "overview.png"), "geojson": url(name, "cells.geojson")}
                for name in slide_output_names(self.queue.store)]

    @app.get("/api/slides/{name}/{part}")
    def slide_file(self, request: Request, name: str, part: str) -> Response:
        """One of a listed slide's files (only those: ``name`` never reaches a path unlisted)."""
        self._authorise(request)
        store = self.queue.store
        if part not in SLIDE_FILES or name not in slide_output_names(store):
            raise HTTPException(404, f"no slide {name!r} with a {part!r} in this output; reload the slides")
        suffix, media_type = SLIDE_FILES[part]
        data = store.fs.cat_file(posixpath.join(store.path, slide_output(name, suffix)))
        disposition = f"attachment; filename*=UTF-8''{urllib.parse.quote(name + suffix)}"
        return Response(data, media_type=media_type,
                        headers={"Content-Disposition": disposition} if suffix == ".geojson" else None)

    @app.get("/api/geojson")
    def geojson(self, request: Request, source_uri: str) -> dict:
        self._authorise(request)
        rows = self.queue.rows()
        rows = rows[rows["source_uri"] == source_uri]
        if rows.empty:
            raise HTTPException(404, f"no committed rows for {source_uri!r}")
        return feature_collections(rows, self.corrections.newest())[source_uri]


TOKEN_ENV = "ALLCORE_REVIEW_TOKEN"  # where jobs/review.py and a deployed config find the token


def review_token(given: str | None) -> str | None:
    """The app's token: the one given, else ``TOKEN_ENV`` from the environment (a deployment
    takes it from a secret store that way, never from its config file)."""
    return given or os.environ.get(TOKEN_ENV)


def build_app(args: dict) -> serve.Application:
    """``serve run``/``serve deploy`` entry: args output, model, cell_model, token; refused
    without a token. Without a ``token`` arg the token is ``ALLCORE_REVIEW_TOKEN`` from the
    environment (as for
    jobs/review.py), so a deployment (infra/k8s/rayservice-review.yaml) takes it from a Secret
    instead of writing it into its Serve config."""
    unknown = set(args) - {"output", "model", "cell_model", "token"}
    if unknown or not {"output", "model"} <= set(args):
        raise ValueError(f"review app args are output=ROOT model=ARTIFACT [cell_model=ARTIFACT] "
                         f"[token=SECRET]; got {sorted(args)}")
    token = review_token(args.get("token"))
    if not token:  # a deployed config may bind beyond loopback (infra/serve_review.yaml does)
        raise ValueError("the review app needs a token when deployed from a config: set "
                         "ALLCORE_REVIEW_TOKEN (e.g. from a Kubernetes Secret) or pass token=SECRET; "
                         "for a loopback-only app on this machine run `python jobs/review.py serve`")
    return ReviewApp.bind(args["output"], args["model"], args.get("cell_model"), token)
