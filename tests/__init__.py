"""The tests' package: mock GPIO, and the warning filters of setup.cfg
installed for every runner (issue 21: trial printed conch's DSA noise and
let warnings from the project's own code pass; pytest reads setup.cfg by
itself). Servers and tools the tests start inherit PYTHONWARNINGS: a
warning from the project's code is an error there too."""

import os
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tests never touch real GPIO: gpiozero's mock pins
os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")


def filter_lines():
    """setup.cfg's ``[tool:pytest] filterwarnings``, in order (later lines
    take precedence, as in pytest)."""
    import configparser
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    text = cfg.get("tool:pytest", "filterwarnings", fallback="")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _category(name):
    import builtins
    import importlib
    if not name:
        return Warning
    if "." not in name:
        return getattr(builtins, name)
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def install_filters():
    """The same filters as pytest's, with its meaning: message and module
    are regular expressions, the module matched from its start."""
    for line in filter_lines():
        action, message, category, module, lineno = (line.split(":") + [""] * 5)[:5]
        try:
            category = _category(category)
        except (ImportError, AttributeError):
            continue                    # a library that is not installed
        warnings.filterwarnings(action, message, category, module,
                                int(lineno) if lineno else 0)


def project_modules():
    """Every module of the server and the command line, by the names it is
    imported under (the laptop's package is ``piccolo3_cli``)."""
    names = ["twisted.plugins.piccolo_plugin"]
    package = os.path.join(ROOT, "piccolo_twisted")
    for directory, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for name in files:
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(directory, name), ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
            if parts[:2] == ["piccolo_twisted", "cli"]:
                names.append(".".join(["piccolo3_cli"] + parts[2:]))
    return sorted(names)


def subprocess_warning_options():
    """PYTHONWARNINGS for the processes the tests start: an error for any
    warning from the project's modules (names given whole: -W takes no
    patterns), ResourceWarning left to Python's default as in setup.cfg."""
    options = [f"error::Warning:{name}" for name in project_modules()]
    return ",".join(options + ["ignore::ResourceWarning"])


install_filters()
if "piccolo_twisted" not in os.environ.get("PYTHONWARNINGS", ""):
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, [os.environ.get("PYTHONWARNINGS"), subprocess_warning_options()]))
