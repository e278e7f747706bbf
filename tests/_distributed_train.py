"""``m2f-jax train`` as tests/test_distributed.py runs it, in a process of its own:
``python tests/_distributed_train.py DEVICES ARGS...`` gives JAX DEVICES virtual CPU devices and
the test-only fast compile options (tests/_fast_compile.py) for the train step, then runs the
command line with ARGS (``train ...``) and exits with its status."""
import os
import sys

if __name__ == "__main__":
    # LLVM -O0 for every program (model init and validation too), as FAST_CPU_COMPILE
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               + f" --xla_force_host_platform_device_count={int(sys.argv[1])}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    from m2f_jax import cli
    from m2f_jax.training import train_step

    options = train_step.train_compiler_options

    def fast_options(platform=None):  # imported when the step is built: after jax.distributed starts
        from tests._fast_compile import FAST_CPU_COMPILE

        return {**options(platform), **FAST_CPU_COMPILE}

    train_step.train_compiler_options = fast_options
    sys.exit(cli.main(sys.argv[2:]))
