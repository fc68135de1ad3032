import os

# The user's TF_CPP_MIN_LOG_LEVEL (None: unset), read before anything imports jax, which
# sets it to '1' where unset: metrics_writer.quiet_logs keeps a user's level, not jax's.
USER_TF_CPP_MIN_LOG_LEVEL = os.environ.get('TF_CPP_MIN_LOG_LEVEL')
