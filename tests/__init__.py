import os
import warnings

# tests never touch real GPIO: gpiozero's mock pins
os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")
warnings.filterwarnings("ignore", category=SyntaxWarning)
