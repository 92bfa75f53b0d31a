"""MONAI Label app serving Medical SAM3 text-prompted segmentation (package ``medsam3_monai``).

Start it (in the environment built by ``make monailabel``)::

    monailabel start_server --app apps/monailabel_medsam3 --studies /path/to/images \
        --conf labels '{"polyp":1}' --conf checkpoint tiny   # no spaces: the wrapper splits them

One infer model (``medsam3``; ``--conf model NAME``) whose labels are the concepts: each label is one text
prompt (its name, or ``--conf prompts '{"polyp": "colon polyp"}'``). See ``lib/configs.py`` for every
``--conf`` key and ``lib/infers/medsam3.py`` for the request parameters; README.md for 3D Slicer and OHIF.
"""

import logging
import os
from pathlib import Path
from typing import Dict

from fastapi import HTTPException

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import medsam3_monai
from lib.configs import ConfError, parse_conf, studies_note
from lib.infers import MedSAM3Infer
from lib.infers.medsam3 import bad_request, is_upload

logger = logging.getLogger(__name__)


class MedSAM3App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        try:
            self.medsam3 = parse_conf(conf)
        except ConfError as err:  # said first, on one line: the server's traceback of the failed start follows
            logger.error(f"medsam3 app: {str(err).rstrip('.')}; the server does not start")
            raise
        logger.info(f"medsam3 app: labels {self.medsam3.labels}, prompts {self.medsam3.prompts}, "
                    f"checkpoint {self.medsam3.checkpoint}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MedSAM3 (medsam3-monai)",
            description="Medical SAM3: text-prompted segmentation of 2D images and 3D volumes, one prompt per label",
            version=getattr(medsam3_monai, "__version__", "0.1.0"),
            labels=dict(self.medsam3.labels),
        )
        note = studies_note(studies, list(settings.MONAI_LABEL_DATASTORE_FILE_EXT))
        if note:
            logger.warning(f"medsam3 app: {note}")

    def infer(self, request, datastore=None):
        image = request.get("image")
        upload = is_upload(image)
        try:
            model = request.get("model")
            if model not in self._infers:  # MONAI Label would answer a bare 500
                raise HTTPException(status_code=404, detail=f"no model {model!r}: this app serves "
                                                            f"{', '.join(map(repr, self._infers))} (GET /info/)")
            if isinstance(image, str) and image and not upload and "session" not in request:
                uri = (datastore or self.datastore()).get_image_uri(image)
                if not uri:  # MONAI Label would pass "" on to the task, or read a server path given as an id
                    if os.path.exists(image):
                        raise bad_request(f"image {Path(image).name!r}: give an image id of the datastore (GET "
                                          "/datastore/?output=all lists them) or upload the file; server paths are "
                                          "not read")
                    raise bad_request(f"image {image!r} is not in the datastore (GET /datastore/?output=all lists "
                                      "its ids); give one of its ids, or upload the file")
                if os.path.exists(image):  # an id that is also a name in the server's folder: the datastore's
                    request = {**request, "image": uri}
            return super().infer(request, datastore)
        except BaseException:
            if upload:  # MONAI Label removes an upload only after a successful answer
                Path(image).unlink(missing_ok=True)
            raise

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:  # MONAI Label would answer a bare 500
            raise HTTPException(status_code=404, detail=f"no strategy {strategy!r}: this app has "
                                                        f"{', '.join(map(repr, self._strategies))}")
        return super().next_sample(request)

    def init_infers(self) -> Dict[str, InferTask]:
        return {self.medsam3.model: MedSAM3Infer(self.medsam3)}

    def init_strategies(self) -> Dict[str, Strategy]:
        # "next sample" in Slicer / OHIF: the datastore's first unlabelled image, or a random one
        return {"first": First(), "random": Random()}
