from tsotsa.coordinator.cli import main

main()
