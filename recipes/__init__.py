"""Speech recipes on the Brain facade (installed as ``fbrain.recipes``).

Each recipe is a SpeechBrain-style training script with a HyperPyYAML config beside it:

- :mod:`.separation`: two-speaker separation with Conv-TasNet, the LibriMix recipe's ``Separation``
  Brain (PIT SI-SNR, ``threshold_byloss``, ``loss_upper_lim``, clipping, non-finite handling).
- :mod:`.enhancement`: the speech-enhancement template's ``SEBrain`` (spectral masking with a
  BiLSTM, masked MSE, STOI on validation, noise augmentation from noise recordings).

Run one with ``python -m fbrain.recipes.separation [config.yaml] [--data_folder PATH] [--device cpu]
[--name value ...]``. Without a data folder a recipe builds its own small data set
(:mod:`.default_data`): real speech from Debian's ``codec2-examples`` when it is installed,
synthetic voiced signals otherwise. Nothing is downloaded.

The recipes need the ``recipes`` extra (HyperPyYAML for the configs, matplotlib for the curves):
``pip install "fbrain[recipes]"``.
"""
