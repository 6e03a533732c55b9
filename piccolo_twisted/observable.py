"""A value that tells its watchers when it changes (no CoAP knowledge)."""


class Observable:
    """Holds one value; ``set`` notifies every watcher when the value changes.

    Watchers are plain callables taking the new value; the CoAP layer
    registers one per observable resource and turns it into notifications.
    """

    __slots__ = ("_value", "_watchers")

    def __init__(self, value=None):
        self._value = value
        self._watchers = []

    @property
    def value(self):
        return self._value

    def set(self, value):
        if value == self._value and type(value) is type(self._value):
            return False
        self._value = value
        self.changed()
        return True

    def changed(self):
        """Notify watchers, e.g. after changing a mutable value in place."""
        for watcher in list(self._watchers):
            watcher(self._value)

    def watch(self, watcher):
        self._watchers.append(watcher)

    def unwatch(self, watcher):
        try:
            self._watchers.remove(watcher)
        except ValueError:
            pass
