"""Ray job: `covidray calibrate` on the cluster it was submitted to. Options: `--help`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/calibrate.py ...
"""

from _entry import run

if __name__ == "__main__":
    run("calibrate")
