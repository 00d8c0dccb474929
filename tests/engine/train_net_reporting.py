"""``train_net.py``'s command line, with every rank reporting what it trained (a test helper).

detectron2 logs the losses on the main process only. Here each process also writes
``OUTPUT_DIR/rank<r>.json``: the iterations it ran, per iteration its batch's total loss averaged
over all processes (an all-reduce, so every rank holds the value the main process logs), and a
SHA-256 of its final weights. Used by ``test_distributed.py`` on "machines" that are local
processes:

    python tests/engine/train_net_reporting.py --config-file configs/r50.yaml --num-machines 2 \\
        --machine-rank 0 --dist-url tcp://127.0.0.1:<port> MODEL.DEVICE cpu ...
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from detectron2.engine import HookBase, default_argument_parser, launch
from detectron2.utils import comm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_net  # noqa: E402


class ReportEveryRank(HookBase):
    """Records this process's total loss of each step, all-reduces it, and writes the report
    after training."""

    def before_train(self):
        self.losses, self._last = [], None
        self.trainer.model.register_forward_hook(self._record)

    def _record(self, module, args, output):
        if module.training:
            self._last = sum(output.values()).detach().double()

    def after_step(self):
        total = self._last.clone()
        if comm.get_world_size() > 1:
            dist.all_reduce(total)
        self.losses.append(float(total) / comm.get_world_size())

    def after_train(self):
        digest = hashlib.sha256()
        for name, value in sorted(self.trainer.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        report = {
            "rank": comm.get_rank(),
            "iterations": len(self.losses),
            "losses": self.losses,
            "weights_sha256": digest.hexdigest(),
        }
        path = os.path.join(self.trainer.cfg.OUTPUT_DIR, f"rank{comm.get_rank()}.json")
        with open(path, "w") as f:
            json.dump(report, f)


class ReportingTrainer(train_net.Trainer):
    def build_hooks(self):
        return super().build_hooks() + [ReportEveryRank()]


def main(args):
    train_net.Trainer = ReportingTrainer
    return train_net.main(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
