"""MONAI Label app serving Medical SAM3 text-prompted segmentation (package ``medsam3_monai``).

Start it (in the environment built by ``make monailabel``)::

    monailabel start_server --app apps/monailabel_medsam3 --studies /path/to/images \
        --conf labels '{"polyp": 1}' --conf checkpoint tiny

One infer model (``medsam3``; ``--conf model NAME``) whose labels are the concepts: each label is one text
prompt (its name, or ``--conf prompts '{"polyp": "colon polyp"}'``). See ``lib/configs.py`` for every
``--conf`` key and ``lib/infers/medsam3.py`` for the request parameters; README.md for 3D Slicer and OHIF.
"""

import logging
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import medsam3_monai
from lib.configs import parse_conf
from lib.infers import MedSAM3Infer

logger = logging.getLogger(__name__)


class MedSAM3App(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.medsam3 = parse_conf(conf)
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

    def init_infers(self) -> Dict[str, InferTask]:
        return {self.medsam3.model: MedSAM3Infer(self.medsam3)}

    def init_strategies(self) -> Dict[str, Strategy]:
        # "next sample" in Slicer / OHIF: the datastore's first unlabelled image, or a random one
        return {"first": First(), "random": Random()}
