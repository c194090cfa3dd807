import sys

from radixlm.bench.cpu_peers.harness import main

sys.exit(main())
