"""Names of the records and entries every strategy writes to, or reads from, Flower messages.

Cloud and edge meet only in messages. Each side names what it writes and reads with constants
of its own (the edge's are in ``clients/protocol.py``), and ``tests/test_wire_names.py`` pins
both sides to the same strings. Names that only one algorithm uses live in that algorithm's
strategy file.
"""

from __future__ import annotations

#: The configuration record of every message the cloud sends (Flower's FedAvg
#: ``configrecord_key`` default), and its entry naming the server round.
CONFIG_RECORD = "config"
ROUND_KEY = "round"
#: The model (or sub-model) a message carries, both ways (Flower's FedAvg ``arrayrecord_key`` default).
ARRAYS_RECORD = "arrays"
#: The metric record of every reply.
METRICS_RECORD = "metrics"
#: The discovery reply's record of the device's resource budget (ECLM's local profiler).
BUDGET_RECORD = "budget"

#: Metric a reply is weighted by: Flower's FedAvg ``weighted_by_key`` default, so Flower's own
#: strategies aggregate the project's replies.
WEIGHT_KEY = "num-examples"
#: Metric naming the device's partition (discovery maps node ids to partition ids with it).
PARTITION_KEY = "partition_id"
#: Metric of the device's virtual compute time in seconds (the round's virtual clock).
COMPUTE_TIME_KEY = "compute_time_s"
#: Metric of the local test accuracy (the round record's ``accuracy``).
ACCURACY_KEY = "accuracy"
#: Count metrics the cloud checks (finite, >= 0) besides the weight and the compute time.
TRAIN_EXAMPLES_KEY = "num_train_examples"
TEST_EXAMPLES_KEY = "num_test_examples"
SAMPLES_TRAINED_KEY = "samples_trained"

#: Online replies: correct pre-adaptation predictions, and the count of uploaded samples.
CORRECT_KEY = "correct"
UPLOAD_COUNT_KEY = "uploads"
#: Online replies: the stream record and its entry naming the batch's domain.
STREAM_RECORD = "stream"
DOMAIN_KEY = "domain"
#: Online replies: the uploaded raw images (uint8, (k, H, W, C)) and their array's key.
UPLOADS_RECORD = "uploads"
PIXELS_KEY = "pixels"
#: Record a simulated device attaches only because the simulation knows the ground truth (e.g.
#: the labels of CEMA's uploads, for the teacher's accuracy). A real device has nothing to put
#: there, so it is no payload and its bytes are not counted.
ORACLE_RECORD = "oracle"
