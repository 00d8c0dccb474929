"""Constants shared by the deployment tests (a module of its own: test files cannot import
conftest reliably)."""

FORMATS = ("onnx", "torch_export", "torchscript")
TOLERANCE = 1e-4  # absolute, on every output of the network and every segment score

# a tiny model: ResNet-18, hidden 32, one layer per stack, 10 queries, images of short side 96
TINY_DEPLOY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.PANOPTIC_SEGFORMER.HIDDEN_DIM", "32",
    "MODEL.PANOPTIC_SEGFORMER.NHEADS", "2",
    "MODEL.PANOPTIC_SEGFORMER.DIM_FEEDFORWARD", "64",
    "MODEL.PANOPTIC_SEGFORMER.ENC_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.DEC_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.NUM_QUERIES", "10",
    "MODEL.PANOPTIC_SEGFORMER.TEST.MAX_DETECTIONS", "10",
    "MODEL.PANOPTIC_SEGFORMER.THING_MASK_LAYERS", "1",
    "MODEL.PANOPTIC_SEGFORMER.STUFF_MASK_LAYERS", "1",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "192",
]  # fmt: skip
