"""Names of the records and entries every edge handler reads from, or writes to, Flower messages.

Cloud and edge meet only in messages. Each side names what it reads and writes with constants
of its own (the cloud's are in ``strategies/protocol.py``), and ``tests/test_wire_names.py`` pins
both sides to the same strings. Names that only one algorithm uses live in that algorithm's
client file.
"""

from __future__ import annotations

#: The configuration record of every message a device receives (Flower's FedAvg
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
#: Metric naming the device's partition.
PARTITION_KEY = "partition_id"
#: Metric of the device's virtual compute time in seconds.
COMPUTE_TIME_KEY = "compute_time_s"
#: Metric of the local test accuracy.
ACCURACY_KEY = "accuracy"
#: Metric of the handler's wall-clock time on the host (measured around every entry point).
WALL_TIME_KEY = "wall_time_s"
#: Count metrics: training and test set sizes, samples trained (examples x epochs).
TRAIN_EXAMPLES_KEY = "num_train_examples"
TEST_EXAMPLES_KEY = "num_test_examples"
SAMPLES_TRAINED_KEY = "samples_trained"

#: Online replies: correct pre-adaptation predictions, and the count of uploaded samples.
CORRECT_KEY = "correct"
UPLOAD_COUNT_KEY = "uploads"
#: Online replies: the stream record, its entries naming the batch's domain and index.
STREAM_RECORD = "stream"
DOMAIN_KEY = "domain"
INDEX_KEY = "index"
#: Online replies: the uploaded raw images (uint8, (k, H, W, C)) and their array's key.
UPLOADS_RECORD = "uploads"
PIXELS_KEY = "pixels"
#: Record a simulated device fills only because the simulation knows the ground truth (e.g. the
#: labels of CEMA's uploads); the cloud does not count it as transmitted bytes.
ORACLE_RECORD = "oracle"
