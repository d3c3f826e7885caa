"""``recokd serve``: the ReCoKD web app (load, Segment, Inspect, download) on 127.0.0.1.

Examples::

    recokd serve --model runs/demo/distilled/model_last.pt --model runs/demo/teacher/model_last.pt
    recokd serve --model runs/ --image ~/.cache/recokd/Dataset901_CTAbdomenOrgans/imagesTs/s3_0000.nii.gz
    recokd serve --model preset:hd-bet --port 9000 --views 3

Open the printed address in a browser. Each ``--model`` is a model file, an nnU-Net v2 model
folder, a folder holding models (searched two levels deep) or ``preset:<name>``; the teacher
presets are always listed. The server binds the loopback interface unless ``--host`` says
otherwise: it reads files on this machine, so only expose it on a network you trust.
Exit codes: 0 stopped, 2 bad input (no such model, missing rendering extra).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="a model file, nnU-Net model folder, folder of models or preset:<name> (repeatable)")
    parser.add_argument("--image", default=None, metavar="PATH", help="a volume to load at start")
    parser.add_argument("--views", type=int, choices=(1, 3), default=1,
                        help="1: axial view; 3: axial, coronal and sagittal (default 1)")
    parser.add_argument("--device", default="auto", help="where models run: auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--encoder", choices=("jpeg", "png"), default="jpeg",
                        help="image encoding of the remote views (default jpeg: faster)")


def run(args: argparse.Namespace) -> int:
    from ReCoKDLib.web.catalogue import find_models

    logging.basicConfig(level=logging.WARNING, format="recokd serve: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("recokd.serve").setLevel(logging.INFO)
    try:
        models = find_models(args.model)
    except ValueError as exc:
        print(f"recokd serve: error: {exc}", file=sys.stderr)
        return 2
    if not os.environ.get("DISPLAY"):  # offscreen rendering through EGL (no X server to try first)
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    try:
        from ReCoKDLib.web.app import ServeApp
    except ImportError as exc:
        print(f"recokd serve: error: the web app needs the rendering extra ({exc}); "
              "install it with: pip install 'recokd[render]'", file=sys.stderr)
        return 2
    app = ServeApp(models=models, image=args.image, views=args.views, device=args.device, encoder=args.encoder)
    print(f"recokd serve: http://{args.host}:{args.port}/ ({len(models)} model(s); Ctrl+C stops)", flush=True)
    try:
        app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False)
    finally:
        app.close()
    return 0
