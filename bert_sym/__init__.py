import os
import sys

# The user's TF_CPP_MIN_LOG_LEVEL (None: unset), read before bert_sym imports jax, which
# sets it to '1' where unset: metrics_writer.quiet_logs keeps a user's level, not jax's.
# Where jax was imported first (a notebook's `import jax`), a '1' is taken for jax's.
USER_TF_CPP_MIN_LOG_LEVEL = os.environ.get('TF_CPP_MIN_LOG_LEVEL')
if 'jax' in sys.modules and USER_TF_CPP_MIN_LOG_LEVEL == '1':
  USER_TF_CPP_MIN_LOG_LEVEL = None
