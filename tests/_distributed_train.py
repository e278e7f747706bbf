"""``m2f-jax train`` as tests/test_distributed.py runs it, in a process of its own:
``python tests/_distributed_train.py DEVICES ARGS...`` gives JAX DEVICES virtual CPU devices and
the test-only fast compile options (tests/_fast_compile.py) for the train step, then runs the
command line with ARGS (``train ...``) and exits with its status. With ``M2F_TEST_SIGTERM=P:N`` in
the environment, process P sends itself SIGTERM right after its Nth step's stop-flag exchange
(``distributed.any_process``), so that its peers learn of it at the next exchange: a deterministic
preemption between two steps."""
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
    if os.environ.get("M2F_TEST_SIGTERM"):
        import signal

        from m2f_jax.training import distributed

        process, call = map(int, os.environ["M2F_TEST_SIGTERM"].split(":"))
        argv = sys.argv[2:]
        if int(argv[argv.index("--process-id") + 1]) == process:
            exchange, calls = distributed.any_process, [0]

            def any_process(flags):
                result = exchange(flags)
                calls[0] += 1
                if calls[0] == call:
                    os.kill(os.getpid(), signal.SIGTERM)
                return result

            distributed.any_process = any_process
    sys.exit(cli.main(sys.argv[2:]))
