"""A skipped update skips every write of the step, not only the update's.

gradwatch skips a non-finite step with a `tf.cond` around the optimizer's
update (`_distributed_tf_update_step`), where the step's verdict is known.
Keras writes some of the optimizer's state earlier, before the gradient
reaches gradwatch, so a `tf.cond` there alone would let them through on a
"skipped" step:

- Nadam advances its `_u_product` in its `_backend_update_step`, before the
  update (through `optimizer.assign`);
- decoupled weight decay (AdamW's `weight_decay`) is applied by
  `_apply_weight_decay` before the gradient is even all-reduced.

On one device both are held back until the update and made inside the same
`tf.cond` (`DeferredWrites`: the capture defers the decay call, and holds the
optimizer's `assign*` writes during `_backend_update_step`): their values are
the ones Keras computed, in Keras' order (the decay, the held writes, the
update), and nothing reads those variables in between, so a step that is not
skipped is bit for bit Keras' own (`tests/test_skip.py`, every Keras
optimizer). Under a distribution strategy they are not held back
(documented limitation: Keras makes them in replica context).
"""


class DeferredWrites:
    """What Keras writes before the step's verdict, kept to be made later, in
    order: calls deferred whole (`defer`), and the writes the optimizer makes
    through `assign`, `assign_add` and `assign_sub` while held (`hold` ...
    `release`), each made again through the optimizer's own method.

    >>> class Optimizer:
    ...     def assign(self, variable, value):
    ...         variable.append(value)
    >>> optimizer, variable = Optimizer(), []
    >>> held = DeferredWrites(optimizer)
    >>> held.defer(lambda: variable.append("decay"))
    >>> held.hold(); optimizer.assign(variable, 1.0); held.release()
    >>> writes = held.take()
    >>> variable, len(writes), held.take()
    ([], 2, [])
    >>> held.replay(writes); variable
    ['decay', 1.0]
    """

    NAMES = ("assign", "assign_add", "assign_sub")

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.writes = []

    def defer(self, write):
        """Keeps `write` (a callable) to be made by `replay`."""
        self.writes.append(write)

    def hold(self):
        """From now on the optimizer's `assign*` writes are kept, not made."""
        def holder(name):
            return lambda variable, value: self.defer(lambda: getattr(self.optimizer, name)(variable, value))
        for name in self.NAMES:
            self.optimizer.__dict__[name] = holder(name)

    def release(self):
        """Stops holding: the optimizer's own methods are back."""
        for name in self.NAMES:
            self.optimizer.__dict__.pop(name, None)

    def take(self):
        """The kept writes, in their order (then forgotten)."""
        writes, self.writes = self.writes, []
        return writes

    @staticmethod
    def replay(writes):
        """Makes the kept writes, in their order."""
        for write in writes:
            write()
