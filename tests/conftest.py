import os

os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")
