from tsotsa.cli import main

main()
