"""TrackML-preset events with fewer particles, for the curriculum that trained
data/trackml_stage1_cpu.ckpt (STAGE1.md): the preset's detector, physics and noise fraction, with
its particle count drawn from [MIN, MAX] and its noise hits from [MIN / 2, MAX / 2].

    python benchmarks/results/cpu-trackml/simulate_fewer.py MIN MAX EVENTS SEED OUT.h5
"""

import dataclasses
import json
import sys

from cachefeat.data.presets import TrackMLPreset
from cachefeat.data.simulate import write_event_file

lo, hi, n_events, seed, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
preset = dataclasses.replace(TrackMLPreset(), n_particles=(lo, hi), n_noise=(lo // 2, hi // 2))
sys.stdout.write(json.dumps(write_event_file(out, preset, n_events, seed)) + "\n")
