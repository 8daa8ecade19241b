"""The synthetic VQA set (scenes, questions, files) and the tiny LLaVA trained on it (``checkpoint/``, package data).

``scene`` draws 96 px images of coloured shapes on grey clutter (12 x 12 = 144 patches), ``questions`` asks
colour / exist / where / count questions that each depend on one object, ``dataset`` makes reproducible splits
from a seed, ``export`` writes them as benchmark / instruction files (and checks a model on a slice). The training
scripts live outside the library, in ``experiments/synthvqa/`` (``train.py``, ``sweep.py``).
"""
