"""Training methods: the registry behind ``--method``.

A method is a name, its own command-line options, its recipe (the option values it
takes when the user gives none) and a factory that turns the run's options and model
into a :class:`Plan`: the optimizer and learning-rate schedule, and optionally a DDP comm
hook, a global batch size per epoch, a different update step and hooks at epoch
boundaries (:mod:`.plan`). Every method is one module of this package, imported
here in the order ``--help`` lists them. To add one, write its factory in a new module,
register it, and import the module below::

    def build_mine(ctx: Context) -> Plan:
        opt = MyOptimizer(ctx.model.parameters(), lr=peak_lr(ctx.args))
        return Plan(opt, lr_schedule(ctx, opt), batch_size=ctx.args.batch_size)

    register(Method("mine", "one line for --help", build_mine, add_arguments=...,
                    recipe={"lr": 0.1, "base_batch_size": 256}))

Every option of every method is on the command line (``--help`` lists them by method);
a method reads its own from ``ctx.args``.
"""

from .plan import METHODS, Context, Method, Plan, peak_lr, register

# Each registers its methods on import.
from . import sgd  # noqa: F401  (sgd, lars, lamb)
from . import delayed  # noqa: F401  (delayed, async-sim)
from . import growing_batch  # noqa: F401
from . import swap  # noqa: F401  (swap, swa)
from . import extrap  # noqa: F401  (extrap, extrap-postlocal)

__all__ = ["METHODS", "Context", "Method", "Plan", "peak_lr", "register"]
