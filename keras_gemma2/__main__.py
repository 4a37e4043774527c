"""`python -m keras_gemma2`: the command line."""

from keras_gemma2.cli import main

main()
