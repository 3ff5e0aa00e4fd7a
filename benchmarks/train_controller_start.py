"""Start of a Ray Train controller-like actor: the trainer's backend config it unpickles decides
whether that process imports torch.

    python benchmarks/train_controller_start.py [--repeats 6]

A one-worker run builds a ``DataParallelTrainer`` with Ray Train's default ``BackendConfig``
(``orchestrator.train.ray_trainer``). Before, it built a ``TorchTrainer`` with a ``TorchConfig``
subclass whose backend did nothing; the Train controller unpickles the backend config with its
callbacks, so a ``TorchConfig`` made the controller import ``ray.train.torch`` and with it torch,
on the path of every trial's start and every resume. This script starts an actor the way Ray
Train starts its controller (no CPU, a runtime env of its own, so a fresh process) with either
config as its argument, interleaved, and prints the seconds until the actor answers, and whether
it had imported torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    from orchestrator.ray_runtime import init_ray, prefer_loopback

    prefer_loopback()  # before Ray is imported, as the CLI does
    import ray
    from ray.train.backend import Backend, BackendConfig

    def torch_config() -> BackendConfig:
        from ray.train.torch import TorchConfig

        class NoProcessGroupTorchConfig(TorchConfig):
            @property
            def backend_cls(self) -> type[Backend]:
                return Backend

        return NoProcessGroupTorchConfig()

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"MODE_CL_CONTROLLER_START": "1"}})
    class Controller:
        def __init__(self, backend_config: BackendConfig) -> None:
            self.backend_config = backend_config

        def imported_torch(self) -> bool:
            return "torch" in sys.modules

    init_ray(None, num_cpus=2)  # a local Ray as mode-cl starts one
    variants = [("TorchConfig subclass", torch_config), ("BackendConfig", BackendConfig)]
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    try:
        for repeat in range(args.repeats):
            for name, make in variants if repeat % 2 == 0 else variants[::-1]:
                started = time.perf_counter()
                actor = Controller.remote(make())
                torch_in = ray.get(actor.imported_torch.remote())
                times[name].append(time.perf_counter() - started)
                ray.kill(actor)
                print(f"{name:<22} {times[name][-1]:5.2f} s  imported torch: {torch_in}", flush=True)
    finally:
        ray.shutdown()
    for name, values in times.items():
        print(f"{name:<22} median {statistics.median(values):.2f} s (min–max {min(values):.2f}–{max(values):.2f})")


if __name__ == "__main__":
    main()
