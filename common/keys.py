"""Names that cross the wire: message actions, record keys and metric keys.

Both sides import these constants so that a renamed key cannot silently break the
protocol.
"""

# Message actions (``MessageType.TRAIN`` and ``MessageType.QUERY`` carry these).
ACTION_BACKBONE = "backbone"
# head.init = closed-form: the sites' feature statistics, before round 0.
ACTION_HEAD_STATISTICS = "head_statistics"

# Record names inside a message's RecordDict.
ADAPTER_RECORD = "adapter"  # ArrayRecord: global adapter (down) or delta (up)
CONFIG_RECORD = "config"  # ConfigRecord: instructions for one round
METRICS_RECORD = "metrics"  # MetricRecord: client metrics
STATUS_RECORD = "status"  # ConfigRecord: a client's answer that is not a result
BACKBONE_RECORD = "backbone"  # ArrayRecord: backbone files as uint8 arrays
SECAGG_RECORD = "secagg"  # ConfigRecord: secure aggregation stage data
MASKED_RECORD = "masked"  # ArrayRecord: a masked, encoded update (uint32)
LABEL_COUNTS_RECORD = "label-counts"  # ArrayRecord: rows per label (fedavg-per-label)
# ArrayRecord: a site's feature statistics in the clear (counts, sums, gram; float64)
STATISTICS_RECORD = "statistics"

# Keys of the round instructions (CONFIG_RECORD).
CFG_BACKBONE_REF = "backbone-ref"
CFG_BACKBONE_FINGERPRINT = "backbone-fingerprint"
CFG_DISTRIBUTE = "model-distribute"
CFG_RUN_CONFIG = "run-config-json"  # the flat run config, re-validated by the client
CFG_LABELS = "labels-json"
CFG_POOLING = "pooling"
CFG_ROUND = "server-round"
CFG_SITES_EVALUATE = "sites-evaluate"  # sites hold out evaluation rows
CFG_EXPECTED_CLIENTS = "expected-clients"  # m, the clients sampled (distributed DP)
# The run's identity (hex), the same after a resume: sites key their kept state by it.
CFG_RUN_IDENTITY = "run-identity"
# Client-level DP of the round: C (adaptive clipping moves it), the delta's noise
# multiplier and sigma_b of the unclipped count (each client adds its share of both).
CFG_DP_CLIP_NORM = "dp-clip-norm"
CFG_DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
CFG_DP_COUNT_STDDEV = "dp-count-stddev"

# Keys of a client's status answer (STATUS_RECORD).
STATUS_KIND = "kind"
STATUS_NEEDS_BACKBONE = "needs-backbone"
STATUS_BACKBONE_STORED = "backbone-stored"

# Keys of the client's metrics (METRICS_RECORD).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
TRAIN_SAMPLES = "train-samples"
ON_CUDA = "on-cuda"
# A site's evaluation totals (the reply to an evaluate message; behind secure
# aggregation they travel masked instead, in common.evaluation.EvalTotals' order).
EVAL_EXAMPLES = "eval-examples"
EVAL_CORRECT = "eval-correct"
EVAL_LOSS_SUM = "eval-loss-sum"
EVAL_TOKENS = "eval-tokens"
# FedSA or other personalised state: the site's personalised model on its own
# evaluation rows (classifiers: accuracy; a causal language model: perplexity).
PERSONAL_ACCURACY = "personal-accuracy"
PERSONAL_PERPLEXITY = "personal-perplexity"
SAMPLE_EPSILON = "sample-epsilon"  # dp.level = sample: the site's DP-SGD epsilon

# Secure aggregation: message actions and the keys of SECAGG_RECORD.
ACTION_SECAGG_ADVERTISE = "secagg_advertise"
ACTION_SECAGG_SHARE = "secagg_share"
ACTION_SECAGG_UNMASK = "secagg_unmask"
ACTION_SECAGG_CONSISTENCY = "secagg_consistency"  # malicious mode: sign survivors
SECAGG_MODE = "mode"  # "honest-but-curious" or "malicious"
SECAGG_COHORT = "cohort"  # clients in the round (the sites' secagg-min-cohort)
SECAGG_IDENTITY = "identity"  # a site's long-term Ed25519 public key (raw)
SECAGG_SIGNATURE = "signature"
SECAGG_PEER_IDENTITIES = "peer-identities"
SECAGG_PEER_SIGNATURES = "peer-signatures"
SECAGG_SIGNERS = "signers"  # consistency check: node ids, identities, signatures
SECAGG_SIGNER_IDENTITIES = "signer-identities"
SECAGG_SIGNATURES = "signatures"
SECAGG_THRESHOLD = "threshold"
SECAGG_CIPHER_PK = "cipher-pk"
SECAGG_MASK_PK = "mask-pk"
SECAGG_PEERS = "peers"  # node ids as decimal strings (they exceed int64)
SECAGG_PEER_CIPHER_PKS = "peer-cipher-pks"
SECAGG_PEER_MASK_PKS = "peer-mask-pks"
SECAGG_SENDERS = "senders"
SECAGG_SEALED = "sealed"
# Commitments to each share (common.secagg.crypto.share_commitment), aligned with
# SECAGG_PEERS in the share stage's reply and with SECAGG_SENDERS in the inbox.
SECAGG_SEED_COMMITMENTS = "seed-commitments"
SECAGG_KEY_COMMITMENTS = "key-commitments"
SECAGG_SCALE = "scale"
SECAGG_CLIP = "clip-norm"
SECAGG_MAX_WEIGHT = "max-weight"
SECAGG_RING_BITS = "ring-bits"  # 32, or 16 for the quantising codecs
SECAGG_COORDINATE_BOUND = "coordinate-bound"  # narrow ring: per-coordinate clip
SECAGG_ROTATION_SEED = "rotation-seed"  # narrow ring: the public rotation's seed
SECAGG_BAD_SENDERS = "bad-senders"
SECAGG_SURVIVORS = "survivors"
SECAGG_DROPPED = "dropped"
SECAGG_SEED_OWNERS = "seed-owners"
SECAGG_SEED_SHARES = "seed-shares"
SECAGG_KEY_OWNERS = "key-owners"
SECAGG_KEY_SHARES = "key-shares"
SECAGG_STATE = "fedgraft-secagg"  # ConfigRecord name in the client's context.state
