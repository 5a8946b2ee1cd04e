from hwr_dist.train.run import main

main()
