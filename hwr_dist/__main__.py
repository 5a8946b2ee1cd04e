from hwr_dist.cli import main

main()
