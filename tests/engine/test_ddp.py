"""DistributedDataParallel needs no search for unused parameters under any config switch: every
trainable parameter gets a gradient in every iteration, whatever the batch holds.

DDP without ``find_unused_parameters`` raises at the iteration after one in which a parameter
got no gradient, with one process as with many; so one gloo process wrapping the model as
``train_net.create_ddp_model`` does, trained on batches with and without things and stuff, is
the test.
"""

import pytest
from skips import require_detectron2

require_detectron2()

import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from d2_helpers import CONFIGS, ROOT, TINY, make_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Instances  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

sys.path.insert(0, str(ROOT))
from panoptic_segformer.d2.engine import train as train_net

PS = "MODEL.PANOPTIC_SEGFORMER."
NO_DATASET = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]  # class ids: things first
SWITCHES = {
    "default": [],
    "box-free": [PS + "BOX_FREE", "True"],
    "3 levels": [PS + "NUM_FEATURE_LEVELS", "3"],
    "early exit": [PS + "TEST.MASK_DECODER_LAYERS", "1"],
    "things only": [PS + "NUM_STUFF_CLASSES", "0", *NO_DATASET],
    "pixel argmax": [PS + "TEST.MERGE", "pixel_argmax"],
    "thing class loss": [PS + "THING_CLASS_WEIGHT", "1.0"],
    "fixed lambdas": [PS + "LAMBDA_THINGS", "1.0", PS + "LAMBDA_STUFF", "1.0"],
    # the paper's ablations (Tables 6, 8, Fig. 5, Sec. 3.3.3)
    "location decoder of 0 layers": [
        PS + "DEC_LAYERS", "0",
        PS + "TEST.THING_CLASSES_FROM", "mask_decoder",
        PS + "THING_CLASS_WEIGHT", "2.0",
    ],
    "location decoder of 1 layer": [PS + "DEC_LAYERS", "1"],
    "joint matching": [PS + "JOINT_MATCHING", "True"],
    "no deep supervision": [PS + "DEEP_SUPERVISION", "False"],
    "mask decoder classes": [
        PS + "TEST.THING_CLASSES_FROM", "mask_decoder", PS + "THING_CLASS_WEIGHT", "2.0",
    ],
}  # fmt: skip
# batches of two images by their classes (contiguous ids: 0..79 things, 80.. stuff)
BATCHES = {
    "things and stuff": ([3, 90], [7]),
    "no things": ([90, 100], [120]),
    "no stuff": ([3, 5], [7]),
    "nothing": ([], []),
}


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    store = tmp_path_factory.mktemp("gloo") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def image(seed, h=64, w=96):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def instances(classes, h=64, w=96):
    result = Instances((h, w))
    masks = torch.zeros(len(classes), h, w, dtype=torch.bool)
    for k in range(len(classes)):
        masks[k, 12 * k : 12 * k + 20, 5 + 8 * k : 50] = True
    result.gt_masks = BitMasks(masks)
    result.gt_classes = torch.tensor(classes, dtype=torch.long)
    return result


@pytest.mark.parametrize("switch", SWITCHES)
def test_ddp_trains_without_unused_parameter_search(switch, one_process_group, monkeypatch):
    torch.manual_seed(0)
    cfg = make_cfg(CONFIGS[0].parent / "r50.yaml", *TINY, *SWITCHES[switch])
    model = build_model(cfg)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)  # as in a 2-process job
    ddp = train_net.create_ddp_model(model)
    assert isinstance(ddp, DistributedDataParallel)
    assert ddp.device_ids is None and not ddp.find_unused_parameters
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    things_only = switch == "things only"
    # every kind of batch, then a first one again: DDP raises in the iteration after one that
    # left a parameter without gradient
    for name in [*BATCHES, "things and stuff"]:
        batch = [[c for c in classes if not (things_only and c >= 80)] for classes in BATCHES[name]]
        inputs = [
            {
                "image": image(i, 64 - 16 * i, 96 - 16 * i),
                "instances": instances(c, 64 - 16 * i, 96 - 16 * i),
            }
            for i, c in enumerate(batch)
        ]
        optimizer.zero_grad(set_to_none=True)
        losses = ddp(inputs)
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], f"{switch}, batch with {name}: no gradient for {missing[:5]}"
        optimizer.step()
