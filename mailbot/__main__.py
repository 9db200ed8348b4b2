from mailbot.cli import main

if __name__ == "__main__":  # a spawned worker process imports this module too (workers.py)
    main()
