from tsotsa.peer.cli import main

main()
